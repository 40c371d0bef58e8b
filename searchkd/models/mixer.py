"""A small MLP-Mixer for 32×32 inputs ("mixer_tiny"), the attention-free heterogeneous student.

Patch 4 on 32×32 gives an 8×8 token grid; sized like vit_tiny (dim 192, 6 blocks) so CNN→ViT
and CNN→Mixer comparisons use students of similar capacity. Taps as for the ViT: stem = the
patch embedding as a map, stages = token outputs of evenly spaced blocks reshaped with
`tokens_to_map`, pool = the mean of the normalised tokens (Mixer has no class token). The
token-mixing MLP is sized by the token count, so a model only accepts inputs of the
`image_size` it was built for.
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import Features, TappedModel, register_model, scaled, tokens_to_map
from .vit import tap_blocks

_PATCH = 4  # 32 / 4 = 8×8 tokens, matching vit_tiny
_DIM = 192  # channel width, matching vit_tiny
_DEPTH = 6  # mixer blocks, matching vit_tiny
# Hidden widths relative to dim, from Mixer-S/16 (dim 512, token MLP 256, channel MLP 2048).
_TOKEN_RATIO = 0.5
_CHANNEL_RATIO = 4


class MixerBlock(nn.Module):
    """Token-mixing MLP across patches, then channel-mixing MLP per patch; both pre-norm."""

    def __init__(self, tokens: int, dim: int, token_hidden: int, channel_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = nn.Sequential(
            nn.Linear(tokens, token_hidden), nn.GELU(), nn.Linear(token_hidden, tokens)
        )
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = nn.Sequential(
            nn.Linear(dim, channel_hidden), nn.GELU(), nn.Linear(channel_hidden, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class MLPMixer(TappedModel):
    def __init__(
        self,
        num_classes: int,
        width: float = 1.0,
        in_channels: int = 3,
        image_size: int = 32,
        depth: int = _DEPTH,
        patch: int = _PATCH,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"mixer depth must be >= 1, got {depth}")
        patch = min(patch, image_size)  # tiny inputs still get at least one token
        dim = scaled(_DIM, width)
        self.grid = image_size // patch
        tokens = self.grid * self.grid
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, patch)
        self.blocks = nn.ModuleList(
            MixerBlock(tokens, dim, scaled(dim, _TOKEN_RATIO), dim * _CHANNEL_RATIO)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.taps = tap_blocks(depth)
        self.stage_channels = [dim] * len(self.taps)
        self.feature_dim = dim
        # Small-normal linears as in vit_tiny (not the reference's zero head, which would block
        # every gradient into the body on the first step and fail the objectives' sanity tests).
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Features:
        stem = self.patch_embed(x)
        if stem.shape[-2:] != (self.grid, self.grid):
            raise ValueError(
                f"mixer built for a {self.grid}×{self.grid} token grid, got "
                f"{tuple(stem.shape[-2:])}; build it with the input's image_size"
            )
        h = stem.flatten(2).transpose(1, 2)
        maps = []
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i in self.taps:
                maps.append(tokens_to_map(h))
        pool = self.norm(h).mean(1)
        return Features(stem=stem, stages=maps, pool=pool, logits=self.head(pool))


@register_model("mixer_tiny")
def mixer_tiny(
    num_classes: int,
    width: float = 1.0,
    in_channels: int = 3,
    image_size: int = 32,
    depth: int = _DEPTH,
    patch: int = _PATCH,
) -> MLPMixer:
    return MLPMixer(num_classes, width, in_channels, image_size, depth, patch)
