"""The engine: one student trained under one objective, in plain PyTorch.

`Engine(spec, seed, teacher_checkpoint)` builds data, teacher, student, objective, optimizer
and schedule; `run_epoch()` trains one epoch, evaluates, and returns the metrics row a trial
reports. `state_dict()` / `load_state_dict()` carry everything needed to resume bit-for-bit
at an epoch boundary. It never imports Ray, Optuna or MLflow: benchmarks and GPU profiling
drive it directly, and the trial is a thin adapter around it.

Val and test: the student kept (`best_student`, `test_acc`) is the best-on-val one; the
test split never chooses anything. `test_acc_last`, the last epoch's test accuracy, is what
the published CIFAR tables report, so it is measured every epoch too. Without a validation
split (`val_fraction: 0`, a reproduction run) there is nothing to choose on: `val_acc`,
`val_top5` and `best_val_acc` are NaN and the kept student is the last epoch's.

Speed choices: data resident on the device with on-device augmentation; on CUDA, bf16
autocast, channels_last and fused optimizers; the teacher runs without a graph; optional
torch.compile of the student.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor, nn

from . import data as data_lib
from .models import Features, TappedModel, build_model, count_macs, count_params
from .objectives import Objective, ObjectiveContext, get_objective
from .spec import Spec, TrainSpec


class NonFiniteLoss(RuntimeError):
    """A trial's loss became NaN or Inf: the trial fails with this reason, the search goes on."""


class CheckpointMismatch(ValueError):
    """A teacher checkpoint whose keys or shapes do not fit the declared architecture."""


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


Weights = str | Path | bytes  # a checkpoint file, or its bytes (as Ray ships a teacher to trials)


def read_checkpoint(source: Any, name: str | Path) -> Any:
    """torch.load with weights_only=True, its failures turned into one line that says why."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing
            warnings.simplefilter("ignore")
            return torch.load(source, map_location="cpu", weights_only=True)
    except EOFError:
        raise CheckpointMismatch(f"{name} is empty or cut short") from None
    except pickle.UnpicklingError as exc:
        detail = next((line.strip() for line in str(exc).splitlines()
                       if line.strip().startswith(("Unsupported", "Trying to"))), "not a weights-only checkpoint")
        raise CheckpointMismatch(
            f"{name} was refused by torch.load(weights_only=True): it is not a checkpoint of plain tensors "
            f"({detail}); only state_dicts are loaded, never code") from None
    except (RuntimeError, ValueError, OSError) as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise CheckpointMismatch(f"{name} is not a PyTorch checkpoint ({first})") from None


def load_weights(model: nn.Module, weights: Weights) -> None:
    """Load a plain state_dict or the public zoo's {'model': state_dict}, weights only.

    A mismatch names the missing / unexpected / mis-shaped keys instead of a stack trace.
    """
    source: Any = io.BytesIO(weights) if isinstance(weights, bytes) else Path(weights).expanduser()
    path = "teacher weights" if isinstance(weights, bytes) else weights
    blob = read_checkpoint(source, path)
    state = blob.get("model", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        raise CheckpointMismatch(f"{path}: expected a state_dict or {{'model': state_dict}}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointMismatch(f"{path}: expected a state_dict of tensors")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if keys:
                more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
                parts.append(f"{label} keys: {', '.join(keys[:3])}{more}")
        raise CheckpointMismatch(f"{path} does not fit the declared arch: " + "; ".join(parts))
    model.load_state_dict(state)


def uses_tf32(cfg: TrainSpec) -> bool:
    """TF32 matmuls and convolutions on CUDA only under bf16: `precision: fp32` means fp32
    arithmetic (the published recipes' numerics), not TF32's 10-bit mantissa."""
    return cfg.precision == "bf16"


def make_optimizer(params: list[nn.Parameter], cfg: TrainSpec, device: torch.device) -> torch.optim.Optimizer:
    fused = device.type == "cuda"  # one kernel for the whole parameter list
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov and cfg.momentum > 0, fused=fused)


def make_schedule(opt: torch.optim.Optimizer, cfg: TrainSpec) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per epoch: the recipe of the KD literature (×0.1 at milestones) or cosine."""
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=cfg.lr_milestones, gamma=cfg.lr_gamma)


class CompiledFeatures(TappedModel):
    """`model` with `forward_features` compiled.

    Objectives call `forward_features`, and `torch.compile(module)` compiles only `forward`:
    attribute lookups on the compiled wrapper reach the original, uncompiled method. So the
    method itself is compiled; parameters, buffers and train/eval mode stay the model's own.
    """

    def __init__(self, model: TappedModel) -> None:
        super().__init__()
        self.model = model
        self._features = torch.compile(model.forward_features)

    def forward_features(self, x: Tensor) -> Features:
        return self._features(x)


@dataclass
class EvalResult:
    top1: float
    top5: float


class Engine:
    def __init__(
        self,
        spec: Spec,
        seed: int = 0,
        teacher_checkpoint: Weights | None = None,
        device: str | torch.device | None = None,
        memory_fraction: float | None = None,
    ) -> None:
        if not isinstance(spec.objective, str):
            raise ValueError("the engine trains one objective; resolve the choice first")
        self.spec = spec
        self.seed = seed
        self.device = pick_device(str(device) if device else None)
        if self.device.type == "cuda":
            if memory_fraction is not None and 0 < memory_fraction < 1:
                torch.cuda.set_per_process_memory_fraction(memory_fraction, self.device)
            torch.backends.cudnn.benchmark = True
            tf32 = uses_tf32(spec.train)
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
        torch.manual_seed(seed)
        cfg = spec.train
        self.cfg = cfg
        d = spec.data
        self.loaders = data_lib.build_loaders(
            d.dataset, root=d.root, download=d.download, val_fraction=d.val_fraction,
            batch_size=cfg.batch_size, device=self.device, seed=seed, **d.options,
        )
        L = self.loaders
        shape = dict(num_classes=L.num_classes, in_channels=L.channels, image_size=L.image_size)
        self.objective_cls: type[Objective] = get_objective(spec.objective)
        self.student: TappedModel = build_model(
            spec.student.arch, width=spec.student.width,
            **({"depth": spec.student.depth} if spec.student.depth else {}), **shape,
        ).to(self.device)
        self.teacher: TappedModel | None = None
        if self.objective_cls.needs_teacher:
            if teacher_checkpoint is None:
                raise ValueError(f"objective {spec.objective!r} needs a teacher checkpoint")
            self.teacher = build_model(spec.teacher.arch, width=spec.teacher.width, **shape)
            load_weights(self.teacher, teacher_checkpoint)
            self.teacher.to(self.device).eval().requires_grad_(False)
        channels_last = self.device.type == "cuda"
        if channels_last:
            self.student.to(memory_format=torch.channels_last)
            if self.teacher is not None:
                self.teacher.to(memory_format=torch.channels_last)

        self.has_val = L.val.num_samples > 0
        shapes_from = L.val if self.has_val else L.test
        example = next(iter(shapes_from))[0][: min(8, shapes_from.num_samples)]
        with torch.no_grad():
            self.student.eval()
            s_feats = self.student.forward_features(example)
            t_feats = self.teacher.forward_features(example) if self.teacher is not None else s_feats
            self.student.train()
        self.objective: Objective = self.objective_cls(
            spec.loss, t_feats, s_feats, ObjectiveContext(L.num_classes, L.num_train, L.train_labels)
        ).to(self.device)
        self.student_params = count_params(self.student)
        # The objective's own trainable parameters (heads; memory banks are buffers): trained
        # beside the student, dropped after, and worth seeing next to student_params.
        self.objective_params = sum(p.numel() for p in self.objective.parameters() if p.requires_grad)
        self.student_macs = count_macs(self.student, example)

        params = [p for p in [*self.student.parameters(), *self.objective.parameters()] if p.requires_grad]
        self.optimizer = make_optimizer(params, cfg, self.device)
        self.scheduler = make_schedule(self.optimizer, cfg)
        self.autocast = self.device.type == "cuda" and cfg.precision == "bf16"
        # What the training step calls: the models themselves, or (train.compile) wrappers
        # whose forward_features is compiled; evaluation always runs the eager student.
        self.train_student: TappedModel = self.student
        self.train_teacher: TappedModel | None = self.teacher
        if cfg.compile:
            self.train_student = CompiledFeatures(self.student)
            if self.teacher is not None:
                self.train_teacher = CompiledFeatures(self.teacher)

        self.epoch = 0
        self.best_val_acc = -math.inf if self.has_val else math.nan
        self.test_acc = math.nan  # test accuracy of the kept (best-on-val, or last) student
        self.best_student: dict[str, Tensor] = copy.deepcopy(self.student.state_dict())
        self.last_row: dict[str, float] = {}  # the metrics of the last epoch, kept in checkpoints
        # The row of the epoch whose student is kept (best on val; the last without a val split):
        # a trial's score is a metric of the student it keeps.
        self.kept_row: dict[str, float] = {}
        # Every row a trial reported, in its state: a trial that runs again reports them again,
        # so a row its driver never recorded (killed, disk full) is not lost.
        self.history: list[dict[str, Any]] = []

    # -- training ---------------------------------------------------------------------------
    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    def train_epoch(self) -> dict[str, float]:
        """One pass over the training split; loss terms are averaged on the device and read once."""
        self.student.train()
        self.objective.train()
        if self.teacher is not None:
            self.teacher.eval()  # never let BN statistics of the frozen teacher move
        loader = self.loaders.train
        loader.set_epoch(self.epoch)
        sums: dict[str, Tensor] = {}
        total = torch.zeros((), device=self.device)
        steps = 0
        seen = 0
        start = time.perf_counter()
        for x, y, idx in loader:
            with self._autocast():
                _, terms = self.objective(self.train_student, self.train_teacher, x, y, idx)
            loss = torch.stack([t.float() for t in terms.values()]).sum()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += loss.detach()
            for k, v in terms.items():
                sums[k] = sums.get(k, torch.zeros((), device=self.device)) + v.detach().float()
            steps += 1
            seen += x.shape[0]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.epoch += 1
        steps = max(steps, 1)
        row = {"train_loss": total.item() / steps}
        row.update({f"loss_{k}": v.item() / steps for k, v in sums.items()})
        bad = [k for k, v in row.items() if not math.isfinite(v)]
        if bad:
            raise NonFiniteLoss(f"non-finite loss at epoch {self.epoch}: {', '.join(bad)}")
        row.update(lr=lr, epoch_seconds=seconds, images_per_second=seen / seconds if seconds else 0.0)
        return row

    @torch.no_grad()
    def evaluate(self, split: str = "val") -> EvalResult:
        self.student.eval()
        loader = getattr(self.loaders, split)
        correct1 = torch.zeros((), device=self.device)
        correct5 = torch.zeros((), device=self.device)
        n = 0
        for x, y, _ in loader:
            with self._autocast():
                logits = self.student(x)
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top == y[:, None]
            correct1 += hit[:, 0].sum()
            correct5 += hit.any(dim=1).sum()
            n += y.shape[0]
        if n == 0:  # an empty split (val_fraction 0) measures nothing
            return EvalResult(math.nan, math.nan)
        return EvalResult(correct1.item() / n, correct5.item() / n)

    def run_epoch(self) -> dict[str, float]:
        """Train one epoch and return the row a trial reports for it."""
        row = self.train_epoch()
        test_last = self.evaluate("test").top1  # reported, never used to choose
        val = self.evaluate("val")
        # Keep the best-on-val student; with no val split nothing is chosen: keep the last.
        kept = not self.has_val or val.top1 > self.best_val_acc
        if kept:
            if self.has_val:
                self.best_val_acc = val.top1
            self.best_student = {k: v.detach().clone() for k, v in self.student.state_dict().items()}
            self.test_acc = test_last
        row.update(
            epoch=self.epoch, val_acc=val.top1, val_top5=val.top5, best_val_acc=self.best_val_acc,
            test_acc=self.test_acc, test_acc_last=test_last, student_params=self.student_params,
            objective_params=self.objective_params, student_macs=self.student_macs,
        )
        if kept or not self.kept_row:
            self.kept_row = dict(row)
        self.last_row = dict(row)
        return row

    @property
    def finished(self) -> bool:
        return self.epoch >= self.cfg.epochs

    # -- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "epoch": self.epoch,
            "student": self.student.state_dict(),
            "objective": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "best_val_acc": self.best_val_acc,
            "test_acc": self.test_acc,
            "best_student": self.best_student,
            "rng_cpu": torch.get_rng_state(),
            "last_row": dict(self.last_row),
            "kept_row": dict(self.kept_row),
            "history": [dict(r) for r in self.history],
        }
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.student.load_state_dict(state["student"])
        self.objective.load_state_dict(state["objective"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.best_val_acc = float(state["best_val_acc"])
        self.test_acc = float(state["test_acc"])
        self.best_student = state["best_student"]
        self.last_row = dict(state.get("last_row", {}))
        self.kept_row = dict(state.get("kept_row", {}))
        self.history = [dict(r) for r in state.get("history", [])]
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)

    def save(self, path: str | Path | IO[bytes]) -> None:
        torch.save(self.state_dict(), path)

    def load(self, path: str | Path | IO[bytes]) -> None:
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        self.save(buf)
        return buf.getvalue()

    def from_bytes(self, blob: bytes) -> None:
        self.load(io.BytesIO(blob))


__all__ = ["CheckpointMismatch", "Engine", "NonFiniteLoss", "load_weights", "pick_device", "uses_tf32"]
