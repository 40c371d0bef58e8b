"""Aggregate throughput of 1, 2 and 4 trials sharing one GPU, as fractional Ray trials do.

    python bench/concurrency.py                                  # CUDA: 1, 2, 4 processes
    python bench/concurrency.py --device cpu --procs 1,2 --small  # CPU / CI-sized form

For each k, k processes (spawned, as Ray's trial workers are) each build an Engine on a
CIFAR-100-sized synthetic set with `memory_fraction = 1/k` (the cap a trial with
`resources: {gpu: 1/k}` gets), train a few warm-up steps, wait for each other at a barrier,
then train the measured steps with the engine's own train_epoch. Aggregate
throughput is all images of the measured epochs over the wall time from the first start to
the last finish, so a straggler counts against it; the table gives it against k = 1.

On a CPU the processes share the cores (each gets cores/k torch threads): the figure only
proves the mechanism works; the question the benchmark answers is about a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (the bench folder is not a package)
    BATCH_SIZE,
    NUM_CLASSES,
    PAIRS,
    TRAIN_SIZE,
    engine_spec,
    environment,
    finish,
    pick_device,
    random_teacher,
    synthetic_data,
    train_steps,
)

# Measured steps per process: seconds of GPU work, so that start-up skew between the
# processes (tens of milliseconds) is small against the window; a few on a CPU.
STEPS = {"cuda": 400, "cpu": 2}
SMALL_STEPS = 2
# Warm-up steps before the barrier: cudnn autotuning, compilation, the allocator's growth.
WARMUP = {"cuda": 30, "cpu": 1}
PROCS = {"cuda": "1,2,4", "cpu": "1,2"}
# How long a process may wait at the barrier for the others to finish building and warming
# up (compilation included) before the run is declared failed.
BARRIER_TIMEOUT_S = 900


def worker(rank: int, k: int, args: dict[str, Any], barrier: Any, results: Any) -> None:
    """One trial's process: its own engine, capped to 1/k of the device's memory."""
    from searchkd.engine import Engine

    device = torch.device(args["device"])
    if device.type == "cpu":
        torch.set_num_threads(args["threads"] or max(1, (os.cpu_count() or 1) // k))
    pair = PAIRS[args["pair"]]
    data = synthetic_data(args["train_size"], args["num_classes"])
    spec = engine_spec(
        pair, Path(args["teacher"]), data, args["batch_size"], compile=args["compile"]
    )
    engine = Engine(
        spec,
        seed=rank,
        teacher_checkpoint=args["teacher"],
        device=device,
        memory_fraction=1.0 / k if k > 1 else None,
    )
    train_steps(engine, args["warmup"])
    barrier.wait(timeout=BARRIER_TIMEOUT_S)
    start = time.monotonic()  # CLOCK_MONOTONIC: comparable across processes on one machine
    row = train_steps(engine, args["steps"])
    end = time.monotonic()
    out = {
        "rank": rank,
        "start": start,
        "end": end,
        "img_s": row["img_s"],
        "images": row["steps"] * args["batch_size"],
    }
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["memory_cap_gib"] = torch.cuda.get_device_properties(device).total_memory / k / 2**30
    results.put(out)


def measure(k: int, args: dict[str, Any]) -> dict[str, Any]:
    """Run k trial processes at once and return their aggregate throughput."""
    ctx = mp.get_context("spawn")  # CUDA cannot be forked; Ray's workers are fresh too
    barrier = ctx.Barrier(k)
    results = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, k, args, barrier, results)) for r in range(k)]
    for p in procs:
        p.start()
    rows = [results.get(timeout=BARRIER_TIMEOUT_S * 2) for _ in range(k)]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"a trial process of k={k} exited with {p.exitcode}")
    window = max(r["end"] for r in rows) - min(r["start"] for r in rows)
    images = sum(r["images"] for r in rows)
    return {
        "procs": k,
        "aggregate_img_s": images / window,
        "window_s": window,
        "per_process": sorted(rows, key=lambda r: r["rank"]),
    }


def run(
    args: argparse.Namespace, report: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Every count of `args.procs`; `report` is handed each count's row as soon as it is
    measured (bench/gpu.py records it before the next count starts)."""
    device = pick_device(args.device)
    steps = args.steps or (SMALL_STEPS if args.small else STEPS[device.type])
    counts = [int(n) for n in (args.procs or PROCS[device.type]).split(",")]
    if counts[0] != 1:
        raise SystemExit("--procs must start with 1: every row is compared against one trial")
    rows = []
    with tempfile.TemporaryDirectory(prefix="searchkd-bench-") as tmp:
        pair = PAIRS[args.pair]
        teacher = random_teacher(pair.teacher, args.num_classes, Path(tmp))
        shared = {
            "device": str(device),
            "pair": args.pair,
            "teacher": str(teacher),
            "steps": steps,
            "warmup": WARMUP[device.type],
            "batch_size": args.batch_size,
            "num_classes": args.num_classes,
            "train_size": args.train_size,
            "compile": args.compile,
            "threads": args.threads,
        }
        print(
            f"{pair.label} ({pair.objective}), batch {args.batch_size}, {steps} steps per process"
        )
        print(f"{'trials':>6} {'aggregate img/s':>16} {'vs 1 trial':>10} {'per trial img/s':>16}")
        for k in counts:
            row = measure(k, shared)
            rows.append(row)
            row["speedup_vs_1"] = row["aggregate_img_s"] / rows[0]["aggregate_img_s"]
            each = ", ".join(f"{r['img_s']:.1f}" for r in row["per_process"])
            print(
                f"{k:>6} {row['aggregate_img_s']:>16.1f} {row['speedup_vs_1']:>9.2f}x {each:>16}",
                flush=True,
            )
            if report is not None:
                report(row)
    env = environment(device)
    env["torch_threads"] = args.threads or [max(1, (os.cpu_count() or 1) // k) for k in counts]
    return {
        **env,
        "pair": pair.label,
        "objective": pair.objective,
        "batch_size": args.batch_size,
        "steps": steps,
        "compile": args.compile,
        "results": rows,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if visible, else cpu")
    p.add_argument("--pair", default="msd", choices=sorted(PAIRS))
    p.add_argument("--procs", help=f"comma-separated trial counts (default {PROCS} by device)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument(
        "--steps",
        type=int,
        help=f"measured steps per process (default {STEPS} by device, {SMALL_STEPS} with --small)",
    )
    p.add_argument("--small", action="store_true", help="CI-sized: a few steps, proves it runs")
    p.add_argument("--num-classes", type=int, default=NUM_CLASSES)
    p.add_argument(
        "--train-size",
        type=int,
        default=TRAIN_SIZE,
        help="training images (default CIFAR's 50,000; smaller only for smoke tests)",
    )
    p.add_argument("--compile", action="store_true", help="engine with train.compile: true")
    p.add_argument(
        "--threads",
        type=int,
        help="CPU only: torch threads per process (default "
        "cores / k, so k processes share the cores)",
    )
    p.add_argument("--json", help="write the figures (and device, versions, command, date) here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return finish(run(args), args.json)


if __name__ == "__main__":
    raise SystemExit(main())
