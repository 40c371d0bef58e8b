"""The engine: students trained under their objectives, in plain PyTorch.

`Cohort(specs, seeds, teacher_checkpoint)` trains K students over the same batches with one
teacher forward per batch (a packed trial); `Engine` is the cohort of one.
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

import contextlib
import copy
import functools
import io
import json
import math
import pickle
import time
import warnings
from collections.abc import Iterator
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
        detail = next(
            (
                line.strip()
                for line in str(exc).splitlines()
                if line.strip().startswith(("Unsupported", "Trying to"))
            ),
            "not a weights-only checkpoint",
        )
        raise CheckpointMismatch(
            f"{name} was refused by torch.load(weights_only=True): it is not a checkpoint of "
            "plain tensors "
            f"({detail}); only state_dicts are loaded, never code"
        ) from None
    except Exception as exc:  # noqa: BLE001 - a damaged file makes the unpickler raise anything
        first = next(
            (line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__
        )
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
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", shapes),
        ):
            if keys:
                more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
                parts.append(f"{label} keys: {', '.join(keys[:3])}{more}")
        raise CheckpointMismatch(f"{path} does not fit the declared arch: " + "; ".join(parts))
    model.load_state_dict(state)


def uses_tf32(cfg: TrainSpec) -> bool:
    """TF32 matmuls and convolutions on CUDA only under bf16: `precision: fp32` means fp32
    arithmetic (the published recipes' numerics), not TF32's 10-bit mantissa."""
    return cfg.precision == "bf16"


def make_optimizer(
    params: list[nn.Parameter], cfg: TrainSpec, device: torch.device
) -> torch.optim.Optimizer:
    fused = device.type == "cuda"  # one kernel for the whole parameter list
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    return torch.optim.SGD(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        nesterov=cfg.nesterov and cfg.momentum > 0,
        fused=fused,
    )


def make_schedule(
    opt: torch.optim.Optimizer, cfg: TrainSpec
) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per epoch: the recipe of the KD literature (×0.1 at milestones) or cosine."""
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    return torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=cfg.lr_milestones, gamma=cfg.lr_gamma
    )


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


class SharedTeacher(TappedModel):
    """The frozen teacher, run once per batch however many students ask for it.

    Objectives call `teacher.forward_features(x)` themselves (some on inputs of their own,
    e.g. mixup). This wrapper remembers the features of the last batch it was given: a second
    call with the very same tensor object returns them instead of running the teacher again, so
    K students of a cohort cost one teacher forward per batch. Any other input runs the teacher
    as before. The cohort forgets the batch before the next one (nothing writes into a batch in
    place between its students). `calls` counts the forwards actually run.
    """

    def __init__(self, teacher: TappedModel) -> None:
        super().__init__()
        self.teacher = teacher
        self.calls = 0
        self._key: Tensor | None = None
        self._features: Features | None = None

    def forward_features(self, x: Tensor) -> Features:
        if self._key is x and self._features is not None:
            return self._features
        features = self.teacher.forward_features(x)
        self.calls += 1
        # Only a graph-free result may be shared: a teacher run with grad belongs to its caller.
        if not torch.is_grad_enabled():
            self._key, self._features = x, features
        return features

    def forget(self) -> None:
        """Drop the kept batch (its features hold device memory)."""
        self._key, self._features = None, None


def _build_student(spec: Spec, shape: dict[str, int], device: torch.device) -> TappedModel:
    return build_model(
        spec.student.arch,
        width=spec.student.width,
        **({"depth": spec.student.depth} if spec.student.depth else {}),
        **shape,
    ).to(device)


class Member:
    """One student of a cohort: its model, objective, optimizer, schedule, random stream and
    what it keeps (best-on-val student, rows). Everything a trial checkpoints is here."""

    def __init__(
        self,
        spec: Spec,
        seed: int,
        student: TappedModel,
        objective: Objective,
        example: Tensor,
        has_val: bool,
        device: torch.device,
    ) -> None:
        cfg = spec.train
        self.spec, self.seed, self.cfg = spec, seed, cfg
        self.student, self.objective = student, objective
        self.student_params = count_params(student)
        # The objective's own trainable parameters (heads; memory banks are buffers): trained
        # beside the student, dropped after, and worth seeing next to student_params.
        self.objective_params = sum(p.numel() for p in objective.parameters() if p.requires_grad)
        self.student_macs = count_macs(student, example)
        params = [p for p in [*student.parameters(), *objective.parameters()] if p.requires_grad]
        self.optimizer = make_optimizer(params, cfg, device)
        self.scheduler = make_schedule(self.optimizer, cfg)
        # What the training step calls: the model itself, or (train.compile) a wrapper whose
        # forward_features is compiled; evaluation always runs the eager student.
        self.train_student: TappedModel = CompiledFeatures(student) if cfg.compile else student
        self.has_val = has_val
        self.epoch = 0
        self.stopped = False  # left its cohort (stopped early): trains no more
        self.best_val_acc = -math.inf if has_val else math.nan
        self.test_acc = math.nan  # test accuracy of the kept (best-on-val, or last) student
        self.best_student: dict[str, Tensor] = copy.deepcopy(student.state_dict())
        self.last_row: dict[str, float] = {}  # the metrics of the last epoch, kept in checkpoints
        # The row of the epoch whose student is kept (best on val; the last without a val split):
        # a trial's score is a metric of the student it keeps.
        self.kept_row: dict[str, float] = {}
        # Every row a trial reported, in its state: a trial that runs again reports them again,
        # so a row its driver never recorded (killed, disk full) is not lost.
        self.history: list[dict[str, Any]] = []
        # Its own random stream (mixup, sampled negatives) when it shares a process with others.
        self.rng: Tensor | None = None
        self.rng_cuda: Tensor | None = None

    @property
    def finished(self) -> bool:
        return self.epoch >= self.cfg.epochs

    @property
    def active(self) -> bool:
        return not self.finished and not self.stopped


class Cohort:
    """K students trained together over the same batches, with one teacher forward per batch.

    `Cohort(specs, seeds, teacher_checkpoint)`: the specs may differ in the student (width,
    arch), the objective and every loss or optimizer setting; they share the data (and its
    order and augmentation: common random numbers, from `data_seed`, by default the first
    seed), the batch size and the precision. Each step, the teacher runs once (shared through
    `SharedTeacher`), then each active student takes its own forward, backward and step.
    A student that stops (`stop(i)`) leaves: it costs nothing after. Students may stand at
    different epochs (one saved an epoch further before a kill): each epoch trains those at
    the lowest epoch, so the others wait and then go on together.
    """

    def __init__(
        self,
        specs: list[Spec],
        seeds: list[int],
        teacher_checkpoint: Weights | None = None,
        device: str | torch.device | None = None,
        memory_fraction: float | None = None,
        data_seed: int | None = None,
    ) -> None:
        if not specs or len(specs) != len(seeds):
            raise ValueError("a cohort needs one seed per student")
        for spec in specs:
            if not isinstance(spec.objective, str):
                raise ValueError("the engine trains one objective; resolve the choice first")
        first = specs[0]
        for spec in specs[1:]:
            if shared_settings(spec) != shared_settings(first):
                raise ValueError(
                    "the students of a cohort share data, teacher, batch size, epochs and precision"
                )
        self.device = pick_device(str(device) if device else None)
        if self.device.type == "cuda":
            if memory_fraction is not None and 0 < memory_fraction < 1:
                torch.cuda.set_per_process_memory_fraction(memory_fraction, self.device)
            torch.backends.cudnn.benchmark = True
            tf32 = uses_tf32(first.train)
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
        self.data_seed = seeds[0] if data_seed is None else data_seed
        torch.manual_seed(seeds[0])
        cfg = first.train
        self.cfg = cfg
        d = first.data
        self.loaders = data_lib.build_loaders(
            d.dataset,
            root=d.root,
            download=d.download,
            val_fraction=d.val_fraction,
            batch_size=cfg.batch_size,
            device=self.device,
            seed=self.data_seed,
            **d.options,
        )
        L = self.loaders
        shape = dict(num_classes=L.num_classes, in_channels=L.channels, image_size=L.image_size)
        self.has_val = L.val.num_samples > 0
        shapes_from = L.val if self.has_val else L.test
        example = next(iter(shapes_from))[0][: min(8, shapes_from.num_samples)]
        channels_last = self.device.type == "cuda"
        self.teacher: TappedModel | None = None
        self.members: list[Member] = []
        for i, (spec, seed) in enumerate(zip(specs, seeds, strict=True)):
            if i:
                torch.manual_seed(seed)
            objective_cls = get_objective(str(spec.objective))
            student = _build_student(spec, shape, self.device)
            if channels_last:
                student.to(memory_format=torch.channels_last)
            if objective_cls.needs_teacher and self.teacher is None:
                if teacher_checkpoint is None:
                    raise ValueError(f"objective {spec.objective!r} needs a teacher checkpoint")
                teacher = build_model(first.teacher.arch, width=first.teacher.width, **shape)
                load_weights(teacher, teacher_checkpoint)
                teacher.to(self.device).eval().requires_grad_(False)
                if channels_last:
                    teacher.to(memory_format=torch.channels_last)
                self.teacher = teacher
            needs = objective_cls.needs_teacher
            with torch.no_grad():
                student.eval()
                s_feats = student.forward_features(example)
                t_feats = (
                    self.teacher.forward_features(example)
                    if needs and self.teacher is not None
                    else s_feats
                )
                student.train()
            objective = objective_cls(
                spec.loss,
                t_feats,
                s_feats,
                ObjectiveContext(L.num_classes, L.num_train, L.train_labels),
            ).to(self.device)
            member = Member(spec, seed, student, objective, example, self.has_val, self.device)
            if len(specs) > 1:  # each student draws from its own stream from here on
                member.rng = torch.get_rng_state()
                if self.device.type == "cuda":
                    member.rng_cuda = torch.cuda.get_rng_state(self.device)
            self.members.append(member)
        self.bf16 = self.device.type == "cuda" and cfg.precision == "bf16"
        # What the training step calls: the shared teacher (compiled with train.compile).
        self.train_teacher: SharedTeacher | None = None
        if self.teacher is not None:
            self.train_teacher = SharedTeacher(
                CompiledFeatures(self.teacher) if cfg.compile else self.teacher
            )

    # -- which students train -------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The epoch the cohort trains next from: the lowest of its active students'."""
        active = [m.epoch for m in self.members if m.active]
        return min(active) if active else max(m.epoch for m in self.members)

    @property
    def finished(self) -> bool:
        return not any(m.active for m in self.members)

    def stepping(self) -> list[int]:
        """The students the next epoch trains: active ones at the cohort's epoch."""
        epoch = self.epoch
        return [i for i, m in enumerate(self.members) if m.active and m.epoch == epoch]

    def stop(self, i: int) -> None:
        """Student i leaves the cohort (stopped early): no more compute for it."""
        self.members[i].stopped = True

    # -- training ---------------------------------------------------------------------------
    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    @contextlib.contextmanager
    def _stream(self, m: Member) -> Iterator[None]:
        """Member m's own random stream, when it has one (a cohort of several)."""
        if m.rng is None:
            yield
            return
        torch.set_rng_state(m.rng)
        if m.rng_cuda is not None:
            torch.cuda.set_rng_state(m.rng_cuda, self.device)
        try:
            yield
        finally:
            m.rng = torch.get_rng_state()
            if m.rng_cuda is not None:
                m.rng_cuda = torch.cuda.get_rng_state(self.device)

    def train_members(self) -> dict[int, dict[str, float]]:
        """One pass over the training split for the students at the cohort's epoch; loss terms
        are averaged on the device and read once. Returns each trained student's row."""
        which = self.stepping()
        if not which:
            return {}
        members = [self.members[i] for i in which]
        for m in members:
            m.student.train()
            m.objective.train()
        if self.teacher is not None:
            self.teacher.eval()  # never let BN statistics of the frozen teacher move
        loader = self.loaders.train
        epoch = self.epoch
        loader.set_epoch(epoch)
        zero = torch.zeros((), device=self.device)
        sums: list[dict[str, Tensor]] = [{} for _ in members]
        totals = [zero.clone() for _ in members]
        steps = 0
        seen = 0
        start = time.perf_counter()
        try:
            for x, y, idx in loader:
                if self.train_teacher is not None:
                    self.train_teacher.forget()
                for j, m in enumerate(members):
                    with self._stream(m), self.autocast():
                        _, terms = m.objective(m.train_student, self.train_teacher, x, y, idx)
                    loss = torch.stack([t.float() for t in terms.values()]).sum()
                    m.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    m.optimizer.step()
                    totals[j] += loss.detach()
                    for k, v in terms.items():
                        sums[j][k] = sums[j].get(k, zero) + v.detach().float()
                steps += 1
                seen += x.shape[0]
        finally:
            if self.train_teacher is not None:
                self.train_teacher.forget()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        steps = max(steps, 1)
        rows: dict[int, dict[str, float]] = {}
        for i, j in zip(which, range(len(members)), strict=True):
            m = members[j]
            lr = m.optimizer.param_groups[0]["lr"]
            m.scheduler.step()
            m.epoch += 1
            row = {"train_loss": totals[j].item() / steps}
            row.update({f"loss_{k}": v.item() / steps for k, v in sums[j].items()})
            bad = [k for k, v in row.items() if not math.isfinite(v)]
            if bad:
                raise NonFiniteLoss(f"non-finite loss at epoch {m.epoch}: {', '.join(bad)}")
            # Each student's images per second: the images it saw over the cohort's wall time.
            row.update(
                lr=lr, epoch_seconds=seconds, images_per_second=seen / seconds if seconds else 0.0
            )
            rows[i] = row
        return rows

    @torch.no_grad()
    def evaluate_member(self, i: int, split: str = "val") -> EvalResult:
        m = self.members[i]
        m.student.eval()
        loader = getattr(self.loaders, split)
        correct1 = torch.zeros((), device=self.device)
        correct5 = torch.zeros((), device=self.device)
        n = 0
        for x, y, _ in loader:
            with self.autocast():
                logits = m.student(x)
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top == y[:, None]
            correct1 += hit[:, 0].sum()
            correct5 += hit.any(dim=1).sum()
            n += y.shape[0]
        if n == 0:  # an empty split (val_fraction 0) measures nothing
            return EvalResult(math.nan, math.nan)
        return EvalResult(correct1.item() / n, correct5.item() / n)

    def run_epochs(self) -> dict[int, dict[str, float]]:
        """Train one epoch of the students at the cohort's epoch; each one's row, by index."""
        rows = self.train_members()
        for i, row in rows.items():
            m = self.members[i]
            test_last = self.evaluate_member(i, "test").top1  # reported, never used to choose
            val = self.evaluate_member(i, "val")
            # Keep the best-on-val student; with no val split nothing is chosen: keep the last.
            kept = not m.has_val or val.top1 > m.best_val_acc
            if kept:
                if m.has_val:
                    m.best_val_acc = val.top1
                m.best_student = {k: v.detach().clone() for k, v in m.student.state_dict().items()}
                m.test_acc = test_last
            row.update(
                epoch=m.epoch,
                val_acc=val.top1,
                val_top5=val.top5,
                best_val_acc=m.best_val_acc,
                test_acc=m.test_acc,
                test_acc_last=test_last,
                student_params=m.student_params,
                objective_params=m.objective_params,
                student_macs=m.student_macs,
            )
            if kept or not m.kept_row:
                m.kept_row = dict(row)
            m.last_row = dict(row)
        return rows

    # -- checkpointing: one state per student -----------------------------------------------
    def member_state(self, i: int) -> dict[str, Any]:
        m = self.members[i]
        state: dict[str, Any] = {
            "epoch": m.epoch,
            "student": m.student.state_dict(),
            "objective": m.objective.state_dict(),
            "optimizer": m.optimizer.state_dict(),
            "scheduler": m.scheduler.state_dict(),
            "best_val_acc": m.best_val_acc,
            "test_acc": m.test_acc,
            "best_student": m.best_student,
            "rng_cpu": m.rng if m.rng is not None else torch.get_rng_state(),
            "last_row": dict(m.last_row),
            "kept_row": dict(m.kept_row),
            "history": [dict(r) for r in m.history],
        }
        if self.device.type == "cuda":
            state["rng_cuda"] = (
                m.rng_cuda if m.rng_cuda is not None else torch.cuda.get_rng_state(self.device)
            )
        return state

    def load_member_state(self, i: int, state: dict[str, Any]) -> None:
        m = self.members[i]
        epoch = int(state["epoch"])
        m.student.load_state_dict(state["student"])
        m.objective.load_state_dict(state["objective"])
        m.optimizer.load_state_dict(state["optimizer"])
        m.scheduler.load_state_dict(state["scheduler"])
        m.epoch = epoch
        m.best_val_acc = float(state["best_val_acc"])
        m.test_acc = float(state["test_acc"])
        m.best_student = state["best_student"]
        m.last_row = dict(state.get("last_row", {}))
        m.kept_row = dict(state.get("kept_row", {}))
        m.history = [dict(r) for r in state.get("history", [])]
        if m.rng is None:
            torch.set_rng_state(state["rng_cpu"])
            if "rng_cuda" in state and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        else:
            m.rng = state["rng_cpu"]
            if "rng_cuda" in state and self.device.type == "cuda":
                m.rng_cuda = state["rng_cuda"]

    def member_bytes(self, i: int) -> bytes:
        buf = io.BytesIO()
        torch.save(self.member_state(i), buf)
        return buf.getvalue()

    def load_member_bytes(self, i: int, blob: bytes) -> None:
        self.load_member_state(
            i, torch.load(io.BytesIO(blob), map_location=self.device, weights_only=True)
        )


def _bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def estimate_pack_bytes(cohort: Cohort, k: int | None = None) -> int:
    """Device memory a cohort of k students needs, estimated (k: the cohort's own size, or its
    first student replicated k times).

    Per student: weights, gradients and optimizer state of the student and its objective's
    heads, the objective's buffers (memory banks), and the activations autograd saves for the
    backward pass, measured on two images and scaled to the batch. Shared: the teacher's
    weights and its features for a batch, and the device-resident dataset. A quarter more for
    the allocator's slack and workspaces.
    """
    L = cohort.loaders
    x, y, idx = next(iter(L.train))
    x, y, idx = x[:2], y[:2], idx[:2]
    batch = cohort.cfg.batch_size
    members = cohort.members if k is None else [cohort.members[0]] * k
    total = 0
    cache: dict[int, int] = {}
    for m in members:
        if id(m) not in cache:
            saved = 0

            def pack(t: Tensor) -> Tensor:
                nonlocal saved
                saved += t.numel() * t.element_size()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), cohort.autocast():
                m.objective(m.student, cohort.teacher, x, y, idx)
            if cohort.train_teacher is not None:
                cohort.train_teacher.forget()
            params = [
                p for p in [*m.student.parameters(), *m.objective.parameters()] if p.requires_grad
            ]
            states = 3 if m.cfg.optimizer == "adamw" else 2 if m.cfg.momentum > 0 else 1
            cache[id(m)] = (
                saved // 2 * batch
                + (1 + states) * _bytes(params)
                + _bytes(m.objective.buffers())
                + _bytes(m.student.buffers())
            )
        total += cache[id(m)]
    if cohort.teacher is not None:
        with torch.no_grad(), cohort.autocast():
            feats = cohort.teacher.forward_features(x[:1])
        per_image = _bytes([feats.stem, *feats.stages, feats.pool, feats.logits])
        total += (
            _bytes(cohort.teacher.parameters())
            + _bytes(cohort.teacher.buffers())
            + per_image * batch
        )
    images = L.num_train + L.val.num_samples + L.test.num_samples
    total += images * x[0].numel()  # resident as uint8
    return int(total * 1.25)


# Private memory of one trial's process before its models: torch, Ray's worker and searchkd's
# code imported, and a digits epoch of a resnet8 x0.25 trained (514 MiB measured on a 2-core
# CPU machine, /proc/self/smaps_rollup Private_*). Trials on one machine share nothing else.
TRIAL_PROCESS_BYTES = 512 << 20


class TooLarge(ValueError):
    """A model whose sizes cannot even be represented (a width like 1e9): one line."""


@dataclass(frozen=True)
class DataShape:
    """What sizes a trial's models and memory: the dataset's classes, channels, image size,
    and the bytes of it each trial holds (device-resident splits; 0 when streamed)."""

    num_classes: int
    in_channels: int
    image_size: int
    resident_bytes: int
    num_train: int = 0

    @classmethod
    def of(cls, spec: Spec, download: bool | None = None) -> DataShape:
        """The shape of the space's dataset, read once per process (raises DatasetNotFound);
        `download=False` never fetches it, whatever the space says."""
        d = spec.data
        options = json.dumps(d.options, sort_keys=True, default=str)
        fetch = d.download if download is None else download
        return _data_shape(d.dataset, d.root, fetch, d.val_fraction, options)

    @property
    def model_kwargs(self) -> dict[str, int]:
        return dict(
            num_classes=self.num_classes, in_channels=self.in_channels, image_size=self.image_size
        )


@functools.lru_cache(maxsize=8)
def _data_shape(
    dataset: str, root: str | None, download: bool, val_fraction: float, options: str
) -> DataShape:
    L = data_lib.build_loaders(
        dataset,
        root=root,
        download=download,
        val_fraction=val_fraction,
        device="cpu",
        **json.loads(options),
    )
    held = [getattr(x, "x", None) for x in (L.train, L.val, L.test)]
    return DataShape(
        L.num_classes,
        L.channels,
        L.image_size,
        sum(_bytes([t]) for t in held if isinstance(t, Tensor)),
        L.num_train,
    )


def largest_students(spec: Spec) -> list[tuple[str, Spec]]:
    """The largest students the space can sample (each arch it may pick, at its widest and
    deepest), each with the key its size comes from: what must fit a trial's memory."""
    values = {
        k: spec.params[f"student.{k}"].values_to_check()
        for k in ("arch", "width", "depth")
        if f"student.{k}" in spec.params
    }
    width = max([spec.student.width, *values.get("width", [])])
    depths = [d for d in [spec.student.depth, *values.get("depth", [])] if d]
    key = "params.student.width" if "width" in values else "student.width"
    out = []
    for arch in values.get("arch", [spec.student.arch]):
        picked = {"student.arch": arch, "student.width": width}
        if depths:
            picked["student.depth"] = max(depths)
        out.append((key, spec.resolved(picked)))
    return out


def model_train_bytes(
    arch: str,
    width: float,
    shape: DataShape,
    batch_size: int,
    cfg: TrainSpec | None = None,
    depth: int | None = None,
) -> int:
    """Memory a model needs to train on a batch, estimated without allocating anything: built
    and run forward on the meta device, its weights, gradients and optimizer state and the
    activations autograd keeps for the backward pass (cfg None: a model that is only run, as a
    teacher beside its students: weights and the activations of a batch). Raises TooLarge for
    sizes past what a tensor can describe."""
    saved = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    extra = {"depth": depth} if depth else {}
    try:
        with torch.device("meta"):
            model = build_model(arch, width=width, **extra, **shape.model_kwargs)
            x = torch.empty(batch_size, shape.in_channels, shape.image_size, shape.image_size)
            if cfg is None:
                with torch.no_grad():
                    out = model.forward_features(x)
                saved = _bytes([out.stem, *out.stages, out.pool, out.logits])
            else:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    model(x)
    except (RuntimeError, OverflowError, ValueError) as exc:
        text = str(exc).strip().splitlines()
        detail = text[0] if text else type(exc).__name__
        raise TooLarge(f"{arch} at width {width:g} cannot be built ({detail})") from None
    weights = _bytes(model.parameters())
    if cfg is None:
        return weights + saved
    states = 3 if cfg.optimizer == "adamw" else 2 if cfg.momentum > 0 else 1
    return (1 + states) * weights + saved + _bytes(model.buffers())


def trial_memory(spec: Spec, shape: DataShape) -> int:
    """Host memory one Tune trial of `spec` holds, estimated: its process, its dataset, and
    (trained on the CPU) its `search.pack` students at the largest the space samples and its
    teacher. Objectives' heads and buffers are left out: a lower bound, for capping how many
    trials run at once."""
    total = TRIAL_PROCESS_BYTES + shape.resident_bytes
    if spec.search.resources.gpu == 0:
        batch = spec.train.batch_size
        total += spec.search.pack * max(
            model_train_bytes(s.arch, s.width, shape, batch, one.train, s.depth)
            for _, one in largest_students(spec)
            for s in [one.student]
        )
        if any(get_objective(o).needs_teacher for o in spec.objectives):
            total += model_train_bytes(spec.teacher.arch, spec.teacher.width, shape, batch)
    return total


def pack_memory_problem(
    estimate: int, k: int, total_bytes: int, fraction: float | None
) -> str | None:
    """Why a pack of k students does not fit its GPU share (None when it fits)."""
    share = total_bytes * (fraction if fraction and 0 < fraction < 1 else 1.0)
    if estimate <= share:
        return None
    of = f"{fraction:g} of " if fraction and 0 < fraction < 1 else ""
    return (
        f"search.pack: {k} students need about {estimate / 2**30:.1f} GiB of GPU memory "
        "(estimated), more "
        f"than a trial's share, {share / 2**30:.1f} GiB (search.resources.gpu {of}a "
        f"{total_bytes / 2**30:.0f} GiB GPU); lower search.pack or give each trial more GPU"
    )


def shared_settings(spec: Spec) -> tuple[Any, ...]:
    """What the students of one cohort must have in common: they train on the same batches
    (data, batch size, the same epoch count) beside one teacher, in one precision."""
    t = spec.train
    return (
        spec.data.model_dump_json(),
        spec.teacher.model_dump_json(),
        t.batch_size,
        t.epochs,
        t.precision,
        t.compile,
    )


class Engine:
    """One student trained under one objective: a cohort of one.

    `Engine(spec, seed, teacher_checkpoint)` builds data, teacher, student, objective,
    optimizer and schedule; `run_epoch()` trains one epoch, evaluates, and returns the metrics
    row a trial reports. `state_dict()` / `load_state_dict()` carry everything needed to resume
    bit-for-bit at an epoch boundary. The work is the cohort's (`cohort`); the engine reads
    what the cohort shares (data, teacher, device) and its one student (`member`).
    """

    def __init__(
        self,
        spec: Spec,
        seed: int = 0,
        teacher_checkpoint: Weights | None = None,
        device: str | torch.device | None = None,
        memory_fraction: float | None = None,
    ) -> None:
        self.spec, self.seed = spec, seed
        self.cohort = Cohort([spec], [seed], teacher_checkpoint, device, memory_fraction)
        self.member: Member = self.cohort.members[0]

    # -- what the cohort shares -------------------------------------------------------------
    @property
    def loaders(self) -> Any:
        return self.cohort.loaders

    @property
    def teacher(self) -> TappedModel | None:
        return self.cohort.teacher

    @property
    def device(self) -> torch.device:
        return self.cohort.device

    # -- its one student --------------------------------------------------------------------
    @property
    def student(self) -> TappedModel:
        return self.member.student

    @property
    def objective(self) -> Objective:
        return self.member.objective

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.member.optimizer

    @property
    def epoch(self) -> int:
        return self.member.epoch

    @property
    def finished(self) -> bool:
        return self.member.finished

    @property
    def best_student(self) -> dict[str, Tensor]:
        return self.member.best_student

    @property
    def best_val_acc(self) -> float:
        return self.member.best_val_acc

    @property
    def test_acc(self) -> float:
        return self.member.test_acc

    @property
    def last_row(self) -> dict[str, float]:
        return self.member.last_row

    def train_epoch(self) -> dict[str, float]:
        """One pass over the training split; loss terms are averaged on the device and read once."""
        return self.cohort.train_members()[0]

    def evaluate(self, split: str = "val") -> EvalResult:
        return self.cohort.evaluate_member(0, split)

    def run_epoch(self) -> dict[str, float]:
        """Train one epoch and return the row a trial reports for it."""
        return self.cohort.run_epochs()[0]

    # -- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return self.cohort.member_state(0)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cohort.load_member_state(0, state)

    def save(self, path: str | Path | IO[bytes]) -> None:
        torch.save(self.state_dict(), path)

    def load(self, path: str | Path | IO[bytes]) -> None:
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))

    def to_bytes(self) -> bytes:
        return self.cohort.member_bytes(0)


__all__ = [
    "CheckpointMismatch",
    "Cohort",
    "Engine",
    "Member",
    "SharedTeacher",
    "estimate_pack_bytes",
    "pack_memory_problem",
    "NonFiniteLoss",
    "load_weights",
    "pick_device",
    "uses_tf32",
]
