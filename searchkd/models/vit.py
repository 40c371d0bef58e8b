"""A small Vision Transformer for 32×32 inputs ("vit_tiny"), the heterogeneous-pair student.

Patch 4 on 32×32 gives an 8×8 token grid, fine enough that the token maps line up with a CIFAR
CNN's last stages. The contract wants maps, so the taps are: stem = the patch embedding as a
map, stages = the token outputs of evenly spaced blocks reshaped with `tokens_to_map` (class
token dropped), pool = the normalised class token. On GPU attention goes through
`F.scaled_dot_product_attention` (fused kernels); on CPU it is spelled out so `count_macs`,
whose FLOP counter does not know the CPU kernel, counts it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Features, TappedModel, register_model, scaled, tokens_to_map

_PATCH = 4  # 32 / 4 = 8×8 tokens
_DIM = 192  # embedding width of DeiT-Tiny
_DEPTH = 6  # half of DeiT-Tiny's 12 blocks: enough for CIFAR, cheap enough to search
_HEADS = 3  # DeiT-Tiny's 64-dimensional heads at dim 192
_MLP_RATIO = 4  # hidden width of each block's MLP relative to dim (ViT default)
_NUM_TAPS = 3  # stage taps, as many as a CIFAR ResNet has stages


def tap_blocks(depth: int, taps: int = _NUM_TAPS) -> list[int]:
    """Indices of `taps` evenly spaced blocks ending with the last one (6 blocks → 1, 3, 5)."""
    taps = min(taps, depth)
    return [round((i + 1) * depth / taps) - 1 for i in range(taps)]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if x.is_cuda:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            # torch's FLOP counter has no formula for the CPU fused kernel, so on CPU (where
            # count_macs usually runs) spell attention out; the result is the same.
            weights = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
            out = weights @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block (LN-attention, LN-MLP, both residual)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(TappedModel):
    def __init__(
        self,
        num_classes: int,
        width: float = 1.0,
        in_channels: int = 3,
        image_size: int = 32,
        depth: int = _DEPTH,
        patch: int = _PATCH,
        heads: int = _HEADS,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"vit depth must be >= 1, got {depth}")
        patch = min(patch, image_size)  # tiny inputs still get at least one token
        # dim must split evenly into heads.
        dim = scaled(_DIM, width, minimum=heads) // heads * heads
        self.patch = patch
        self.grid = image_size // patch
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid * self.grid, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, _MLP_RATIO) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.taps = tap_blocks(depth)
        self.stage_channels = [dim] * len(self.taps)
        self.feature_dim = dim
        # ViT init: truncated normal std 0.02 for embeddings and linears (Dosovitskiy et al.).
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def _pos_embed(self, grid: int) -> Tensor:
        """Position embeddings, bicubically resized when the input is not `image_size`."""
        if grid == self.grid:
            return self.pos_embed
        cls_pos, grid_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid_pos = tokens_to_map(grid_pos)
        grid_pos = F.interpolate(grid_pos, size=(grid, grid), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, grid_pos.flatten(2).transpose(1, 2)], 1)

    def forward_features(self, x: Tensor) -> Features:
        stem = self.patch_embed(x)
        b, _, gh, gw = stem.shape
        if gh != gw:
            raise ValueError(f"vit needs square inputs, got a {gh}×{gw} token grid")
        tokens = stem.flatten(2).transpose(1, 2)
        h = torch.cat([self.cls_token.expand(b, -1, -1), tokens], 1) + self._pos_embed(gh)
        maps = []
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i in self.taps:
                maps.append(tokens_to_map(h[:, 1:]))
        pool = self.norm(h[:, 0])
        return Features(stem=stem, stages=maps, pool=pool, logits=self.head(pool))


@register_model("vit_tiny")
def vit_tiny(
    num_classes: int,
    width: float = 1.0,
    in_channels: int = 3,
    image_size: int = 32,
    depth: int = _DEPTH,
    patch: int = _PATCH,
    heads: int = _HEADS,
) -> VisionTransformer:
    return VisionTransformer(num_classes, width, in_channels, image_size, depth, patch, heads)
