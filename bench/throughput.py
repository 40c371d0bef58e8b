"""Training throughput: searchkd's engine against the classic KD loop, in one process.

    python bench/throughput.py                         # CUDA if visible, full settings
    python bench/throughput.py --device cpu --small    # the CPU / CI-sized form

For each teacher → student pair, the same objective module, batch size and optimiser recipe
are timed twice, in steady state (after a warm-up), in images per second:

engine     searchkd.engine.Engine's own training loop (train_epoch): data resident on the
           device as uint8, crop/flip/normalise on the device per batch, and on CUDA bf16
           autocast, channels_last and the fused optimiser (and torch.compile with --compile).
           A warm-up epoch of a few steps (cudnn autotuning, compilation), then an epoch of
           the measured steps; the figure is what train_epoch itself reports.
reference  the loop of the classic KD codebases (RepDistiller and its descendants):
           torchvision's CIFAR dataset read from the real python-pickle files, per-sample
           RandomCrop(32, 4) / RandomHorizontalFlip / ToTensor / Normalize in DataLoader
           workers, fp32, teacher forward under no_grad, then student forward, backward and
           SGD step, and the per-step `loss.item()` their running-average meters do.
           The loader's worker start-up is inside the warm-up, so it is not counted (the
           classic loop pays it every epoch): that favours the reference.

Both train on a CIFAR-100-sized set (50,000 images, 100 classes) of which the measured
steps are the first batches: CRD's memory banks and negatives then cost what they cost on
CIFAR-100. The images are synthetic and the teacher's weights random: throughput depends on
neither, and nothing needs downloading.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (the bench folder is not a package)
    BATCH_SIZE,
    LR,
    MOMENTUM,
    NUM_CLASSES,
    TRAIN_SIZE,
    WEIGHT_DECAY,
    OpCounter,
    Pair,
    engine_spec,
    environment,
    finish,
    parse_pairs,
    pick_device,
    random_teacher,
    synthetic_data,
    train_steps,
    write_cifar,
)

from searchkd.engine import Engine, load_weights  # noqa: E402
from searchkd.models import build_model  # noqa: E402
from searchkd.objectives import ObjectiveContext, get_objective  # noqa: E402

# Measured steps: enough on a GPU for the figure to settle to a percent or so (each step is
# milliseconds there); on a CPU a step of these pairs takes seconds, so a few prove it works.
STEPS = {"cuda": 400, "cpu": 3}
SMALL_STEPS = 3
# Warm-up steps of both loops: cudnn autotuning, compilation, the allocator's first growth
# and (reference) the DataLoader workers' start-up and first prefetches.
WARMUP = {"cuda": 30, "cpu": 1}
# Alternations of engine and reference (median reported): on a GPU they are cheap and show
# the spread; on a CPU each costs minutes, so one unless asked.
REPEATS = {"cuda": 3, "cpu": 1}
# DataLoader workers of the reference: the classic codebases use 8 (RepDistiller's default),
# capped at the cores there are.
WORKERS = min(8, os.cpu_count() or 1)
# CIFAR's crop padding and per-channel statistics (CIFAR-100 training set; the values matter
# only as constants the transform applies).
CROP_PADDING = 4
MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


class Indexed(Dataset):
    """(image, label, index): the classic codebases' CIFAR100Instance, which CRD's memory
    bank needs."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        x, y = self.ds[i]
        return x, y, i


class EngineLoop:
    """searchkd's Engine for one pair, timed through its own train_epoch."""

    def __init__(
        self,
        pair: Pair,
        teacher: Path,
        device: torch.device,
        batch_size: int,
        num_classes: int,
        train_size: int,
        compile: bool,
    ) -> None:
        spec = engine_spec(
            pair, teacher, synthetic_data(train_size, num_classes), batch_size, compile=compile
        )
        self.device = device
        self.engine = Engine(spec, seed=0, teacher_checkpoint=teacher, device=device)

    def measure(self, warmup: int, steps: int) -> dict[str, Any]:
        """Images per second of `steps` steps, after `warmup` steps (only the first time)."""
        torch.backends.cuda.matmul.allow_tf32 = True  # what the engine sets for itself
        if warmup:
            train_steps(self.engine, warmup)
        return train_steps(self.engine, steps)

    def ops_per_step(self) -> int:
        """aten operators of one more training step (augmentation and optimiser included)."""
        with OpCounter() as counter:
            train_steps(self.engine, 1)
        return counter.count


class ReferenceLoop:
    """The classic KD training loop for one pair (see the module docstring)."""

    def __init__(
        self,
        pair: Pair,
        teacher_path: Path,
        device: torch.device,
        batch_size: int,
        num_classes: int,
        train_size: int,
        workers: int,
        root: Path,
    ) -> None:
        from torchvision import transforms

        self.device = device
        files = write_cifar(root, train_size, num_classes)
        transform = transforms.Compose(
            [
                transforms.RandomCrop(32, padding=CROP_PADDING),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(MEAN, STD),
            ]
        )
        with files.accepted():
            dataset = files.cls(str(root), train=True, download=False, transform=transform)
        self.loader = DataLoader(
            Indexed(dataset),
            batch_size=batch_size,
            shuffle=True,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            drop_last=True,
        )
        self.workers = workers
        shape = {"num_classes": num_classes, "image_size": 32}
        self.teacher = build_model(pair.teacher, **shape)
        load_weights(self.teacher, teacher_path)
        self.teacher.to(device).eval().requires_grad_(False)
        self.student = build_model(pair.student, **shape).to(device)
        example = torch.stack([dataset[i][0] for i in range(8)]).to(device)
        with torch.no_grad():
            self.student.eval()
            t_feats = self.teacher.forward_features(example)
            s_feats = self.student.forward_features(example)
            self.student.train()
        self.objective = (
            get_objective(pair.objective)(
                {}, t_feats, s_feats, ObjectiveContext(num_classes, len(dataset))
            )
            .to(device)
            .train()
        )
        params = [*self.student.parameters(), *self.objective.parameters()]
        self.optimizer = torch.optim.SGD(
            params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
        )

    def measure(self, warmup: int, steps: int) -> dict[str, Any]:
        """Images per second over `steps` batches after `warmup` batches of a fresh epoch
        (a fresh epoch starts the loader's workers again: the warm-up absorbs that)."""
        # The classic codebases' settings: cudnn autotuning on (they set it), the rest torch's
        # defaults (no TF32 matmuls), whatever the engine set in this process.
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = True
        warmup = max(warmup, 1)  # the first batch waits for the workers to start
        if len(self.loader) < warmup + steps:
            raise SystemExit(
                f"--train-size holds {len(self.loader)} batches; the reference needs "
                f"{warmup + steps} (warm-up + measured)"
            )
        dev = self.device
        start = 0.0
        loss_sum = 0.0
        for i, (x, y, idx) in enumerate(self.loader):
            if i == warmup + steps:
                break
            if i == warmup:
                _sync(dev)
                start = time.perf_counter()
            loss_sum += self._step(x, y, idx)
        _sync(dev)
        seconds = time.perf_counter() - start
        return {
            "img_s": steps * self.loader.batch_size / seconds,
            "steps": steps,
            "seconds": seconds,
            "loss": loss_sum / (warmup + steps),
            "workers": self.workers,
        }

    def _step(self, x: Tensor, y: Tensor, idx: Tensor) -> float:
        dev = self.device
        x, y, idx = x.to(dev), y.to(dev), idx.to(dev)
        _, terms = self.objective(self.student, self.teacher, x, y, idx)  # teacher: no_grad
        loss = sum(terms.values())
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.item()  # the classic AverageMeter: one host sync per step

    def ops_per_step(self) -> int:
        """aten operators of one more training step in this process (the per-sample
        transforms run in the loader's workers and are not counted)."""
        x, y, idx = next(iter(self.loader))
        with OpCounter() as counter:
            self._step(x, y, idx)
        return counter.count


def measure_pair(
    pair: Pair,
    teacher: Path,
    device: torch.device,
    args: argparse.Namespace,
    steps: int,
    warmup: int,
    root: Path,
) -> dict[str, Any]:
    """Engine and reference, alternately `repeats` times; the figure of each is its median.

    Alternating spreads any drift of the machine's load (a shared CPU) over both loops alike.
    """
    engine = EngineLoop(
        pair, teacher, device, args.batch_size, args.num_classes, args.train_size, args.compile
    )
    runs: dict[str, list[dict[str, Any]]] = {"engine": [engine.measure(warmup, steps)]}
    # The engine's first measurement ran alone on the device: its peak is one trial's memory.
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    reference = None
    if args.reference:
        reference = ReferenceLoop(
            pair,
            teacher,
            device,
            args.batch_size,
            args.num_classes,
            args.train_size,
            args.workers,
            root,
        )
        runs["reference"] = [reference.measure(warmup, steps)]
    for _ in range(1, args.repeats):
        runs["engine"].append(engine.measure(0, steps))
        if reference is not None:
            runs["reference"].append(reference.measure(warmup, steps))
    out: dict[str, Any] = {
        "pair": pair.label,
        "objective": pair.objective,
        "batch_size": args.batch_size,
        "compile": args.compile,
        "repeats": args.repeats,
    }
    for name, rows in runs.items():
        ordered = sorted(rows, key=lambda row: row["img_s"])
        out[name] = {**ordered[len(ordered) // 2], "all_img_s": [row["img_s"] for row in rows]}
    out["engine"]["ops_per_step"] = engine.ops_per_step()
    if reference is not None:
        out["ratio"] = out["engine"]["img_s"] / out["reference"]["img_s"]
        out["reference"]["ops_per_step"] = reference.ops_per_step()
    if device.type == "cuda":
        out["engine"]["peak_memory_gib"] = peak
        out["peak_memory_gib_both"] = torch.cuda.max_memory_allocated(device) / 2**30
    del engine, reference
    _release(device)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    """Free the previous measurement's memory so the next one starts from an empty device."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run(
    args: argparse.Namespace, report: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Every pair of `args.pairs`; `report` is handed each pair's figures as soon as they are
    measured (bench/gpu.py records them before the next pair starts)."""
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps or (SMALL_STEPS if args.small else STEPS[device.type])
    warmup = WARMUP[device.type]
    args.repeats = args.repeats or REPEATS[device.type]
    results = []
    with tempfile.TemporaryDirectory(prefix="searchkd-bench-") as tmp:
        for pair in parse_pairs(args.pairs):
            teacher = random_teacher(pair.teacher, args.num_classes, Path(tmp))
            results.append(
                measure_pair(
                    pair,
                    teacher,
                    device,
                    args,
                    steps,
                    warmup,
                    Path(tmp) / f"cifar-{pair.objective}",
                )
            )
            _print_row(results[-1], first=len(results) == 1)
            if report is not None:
                report(results[-1])
    return {**environment(device), "compile": args.compile, "results": results}


def _print_row(r: dict[str, Any], first: bool) -> None:
    if first:
        print(
            f"{'pair':<26} {'objective':<9} {'batch':>5} {'engine img/s':>13} "
            f"{'reference img/s':>16} {'ratio':>7} {'aten ops/step (engine, ref)':>28}"
        )
    e, ref = r["engine"], r.get("reference")
    ref_img_s = f"{ref['img_s']:>16.1f}" if ref else f"{'-':>16}"
    ratio = f"{r['ratio']:>6.2f}x" if ref else f"{'-':>7}"
    ops = f"{e['ops_per_step']}, {ref['ops_per_step'] if ref else '-'}"
    print(
        f"{r['pair']:<26} {r['objective']:<9} {r['batch_size']:>5} {e['img_s']:>13.1f} "
        f"{ref_img_s} {ratio} {ops:>28}",
        flush=True,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if visible, else cpu")
    p.add_argument(
        "--pairs",
        default="msd,crd",
        help="comma-separated: msd (resnet32x4 -> resnet8x4), crd (wrn_40_2 -> wrn_16_2)",
    )
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument(
        "--steps",
        type=int,
        help=f"measured steps (default {STEPS} by device, {SMALL_STEPS} with --small)",
    )
    p.add_argument("--small", action="store_true", help="CI-sized: a few steps, proves it runs")
    p.add_argument(
        "--num-classes",
        type=int,
        default=NUM_CLASSES,
        choices=[10, 100],
        help="100: CIFAR-100 files (default); 10: CIFAR-10 (smaller smoke tests)",
    )
    p.add_argument(
        "--train-size",
        type=int,
        default=TRAIN_SIZE,
        help="training images (default CIFAR's 50,000; smaller only for smoke tests)",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads of this process (default: torch's); "
        "1 is steadier on a CPU shared with other work",
    )
    p.add_argument(
        "--repeats",
        type=int,
        help="alternate engine and reference this many times "
        f"and report each one's median (default {REPEATS} by device)",
    )
    p.add_argument("--workers", type=int, default=WORKERS, help="reference DataLoader workers")
    p.add_argument("--compile", action="store_true", help="engine with train.compile: true")
    p.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        help="the engine alone (a --compile run against the eager run's reference)",
    )
    p.add_argument("--json", help="write the figures (and device, versions, command, date) here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return finish(run(args), args.json)


if __name__ == "__main__":
    raise SystemExit(main())
