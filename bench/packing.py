"""Packed trials: K students over one teacher forward per batch, against K separate trials.

    python bench/packing.py --device cpu --threads 1 --json bench/results/packing-cpu.json
    python bench/packing.py --device cpu --threads 1 --small     # the smoke-test form

For each configuration (resnet32x4 -> resnet8x4 under msd and under crd, wrn_40_2 -> wrn_16_2
under crd; batch 64, CIFAR-100-sized synthetic set) and each K in --packs, one process
builds a `Cohort` of K identical students (seeds 0..K-1), trains a warm-up step, then the
measured steps through the cohort's own training loop, and times the teacher's forward alone
over the same number of batches. Figures:

student_img_s       student-images per second: images trained per second, counted once per
                    student (each of the K students trains on every batch, so K x batch per
                    step); what a search's progress is made of
separate_img_s      the same for K separate trials run one after another on the same device:
                    the K = 1 figure (a trial is a cohort of one)
speedup             student_img_s / separate_img_s: the per-student speed-up of packing
cohort_img_s        images per second of the cohort's loop (each student advances at this rate)
teacher_share       the teacher forward's share of a K = 1 step, s
ideal_speedup       1 / (s/K + (1 - s)): the teacher paid once instead of K times, nothing else
efficiency          speedup / ideal_speedup (the issue's target: >= 0.9 at K = 4)
teacher_calls_per_step  teacher forwards actually run per batch (1 whatever K)
peak_memory_mib     CPU: the process's peak RSS; CUDA: torch's peak allocation

On a CPU the times are the process's CPU time (one torch thread): the gain of packing is
arithmetic there, and CPU time does not count the waits of a machine shared with other jobs
(wall times are recorded beside them). Each K runs in its own process, so peaks are its own.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (the bench folder is not a package)
    BATCH_SIZE,
    NUM_CLASSES,
    TRAIN_SIZE,
    FirstSteps,
    Pair,
    engine_spec,
    environment,
    finish,
    pick_device,
    random_teacher,
    synthetic_data,
)

# The configurations the issue names: the largest gap of the CRD table under msd and under
# crd, and the WRN pair under crd.
CONFIGS: dict[str, Pair] = {
    "msd": Pair("msd", "resnet32x4", "resnet8x4"),
    "crd": Pair("crd", "resnet32x4", "resnet8x4"),
    "wrn": Pair("crd", "wrn_40_2", "wrn_16_2"),
}
STEPS = {"cuda": 200, "cpu": 3}
WARMUP = {"cuda": 20, "cpu": 1}
SMALL_STEPS = 1


@dataclass
class Timed:
    wall_s: float
    cpu_s: float


def _clock(device: torch.device) -> tuple[float, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float], device: torch.device) -> Timed:
    wall, cpu = _clock(device)
    return Timed(wall - start[0], cpu - start[1])


def cohort_steps(cohort: Any, steps: int) -> Timed:
    """`steps` steps of the cohort's own training loop (one short epoch), timed."""
    full = cohort.loaders.train
    try:
        cohort.loaders.train = FirstSteps(full, steps)
        start = _clock(cohort.device)
        cohort.train_members()
        return _since(start, cohort.device)
    finally:
        cohort.loaders.train = full


@torch.no_grad()
def teacher_steps(cohort: Any, steps: int) -> Timed:
    """The teacher's forward alone over `steps` training batches (as a step runs it)."""
    loader = FirstSteps(cohort.loaders.train, steps)
    batches = [x for x, _, _ in loader]
    start = _clock(cohort.device)
    for x in batches:
        with cohort.autocast():
            cohort.teacher.forward_features(x)
    return _since(start, cohort.device)


def worker(args: dict[str, Any], results: Any) -> None:
    """One K of one configuration, in its own process."""
    from searchkd.engine import Cohort

    device = torch.device(args["device"])
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    pair = CONFIGS[args["config"]]
    data = synthetic_data(args["train_size"], args["num_classes"])
    spec = engine_spec(pair, Path(args["teacher"]), data, args["batch_size"])
    k = args["k"]
    cohort = Cohort([spec] * k, list(range(k)), teacher_checkpoint=args["teacher"], device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cohort_steps(cohort, args["warmup"])
    before = cohort.train_teacher.calls
    step = cohort_steps(cohort, args["steps"])
    calls = cohort.train_teacher.calls - before
    teacher = teacher_steps(cohort, args["steps"])
    steps, batch = args["steps"], args["batch_size"]
    use = (lambda t: t.cpu_s) if device.type == "cpu" else (lambda t: t.wall_s)
    out = {
        "k": k,
        "steps": steps,
        "step_s": use(step) / steps,
        "step_wall_s": step.wall_s / steps,
        "step_cpu_s": step.cpu_s / steps,
        "teacher_s": use(teacher) / steps,
        "teacher_wall_s": teacher.wall_s / steps,
        "student_img_s": k * steps * batch / use(step),
        "student_img_s_wall": k * steps * batch / step.wall_s,
        "cohort_img_s": steps * batch / use(step),
        "teacher_calls_per_step": calls / steps,
    }
    if device.type == "cuda":
        out["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        out["peak_memory_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results.put(out)


def run_config(
    name: str,
    packs: list[int],
    base: dict[str, Any],
    folder: Path,
    report: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Each K of `packs` (sorted, 1 first) for one configuration; `report` is handed the
    configuration's figures so far after each K (bench/gpu.py records them as they come)."""
    pair = CONFIGS[name]
    teacher = random_teacher(pair.teacher, base["num_classes"], folder)
    ctx = mp.get_context("spawn")
    rows: list[dict[str, Any]] = []
    config: dict[str, Any] = {
        "config": name,
        "objective": pair.objective,
        "teacher": pair.teacher,
        "student": pair.student,
        "results": rows,
    }
    for k in packs:
        queue = ctx.Queue()
        job = {**base, "config": name, "k": k, "teacher": str(teacher)}
        if base["in_process"]:  # the smoke test: no process start-ups (peaks are the process's)
            worker(job, queue)
        else:
            proc = ctx.Process(target=worker, args=(job, queue))
            proc.start()
        out = queue.get()
        if not base["in_process"]:
            proc.join()
        rows.append(out)
        print(
            f"  {name} K={k}: {out['student_img_s']:.1f} student-img/s, step {out['step_s']:.3f}s, "
            f"teacher {out['teacher_s']:.3f}s, peak {out['peak_memory_mib']:.0f} MiB",
            flush=True,
        )
        one = rows[0]  # K = 1: packs start with it
        share = min(1.0, one["teacher_s"] / one["step_s"])
        config["teacher_share"] = share
        out["separate_img_s"] = one["student_img_s"]
        out["speedup"] = out["student_img_s"] / one["student_img_s"]
        out["ideal_speedup"] = 1.0 / (share / k + (1.0 - share))
        out["efficiency"] = out["speedup"] / out["ideal_speedup"]
        if report is not None:
            report(config)
    return config


def table(payload: dict[str, Any]) -> str:
    lines = [
        "| pair | objective | K | packed student-img/s | separate student-img/s | speedup | ideal "
        "| efficiency "
        "| teacher share | teacher calls/step | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in payload["configs"]:
        for r in c["results"]:
            lines.append(
                f"| {c['teacher']} -> {c['student']} | {c['objective']} | {r['k']} | "
                f"{r['student_img_s']:.1f} | {r['separate_img_s']:.1f} | {r['speedup']:.2f}x | "
                f"{r['ideal_speedup']:.2f}x | {100 * r['efficiency']:.0f}% | "
                f"{c['teacher_share']:.2f} | "
                f"{r['teacher_calls_per_step']:.0f} | {r['peak_memory_mib']:.0f} |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None)
    ap.add_argument("--configs", default="msd,crd,wrn", help=f"of {', '.join(CONFIGS)}")
    ap.add_argument("--packs", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    ap.add_argument("--num-classes", type=int, default=NUM_CLASSES)
    ap.add_argument("--train-size", type=int, default=TRAIN_SIZE)
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads per process (CPU); 0: torch's default"
    )
    ap.add_argument(
        "--small",
        action="store_true",
        help="smoke test: batch 4, 10 classes, 40 images, K 1,2, in this process",
    )
    ap.add_argument("--json", default=None)
    return ap.parse_args(argv)


def run(
    args: argparse.Namespace, report: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Every configuration of `args.configs` at every K; `report` is handed a configuration's
    figures so far after each K."""
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        raise SystemExit(
            f"unknown configuration {unknown[0] if unknown else args.configs!r}; known: "
            f"{', '.join(CONFIGS)}"
        )
    device = pick_device(args.device)
    if args.small:
        args.batch_size, args.num_classes, args.train_size, args.packs = 4, 10, 40, "1,2"
        args.steps = args.steps or SMALL_STEPS
    packs = sorted({int(k) for k in str(args.packs).split(",")} | {1})
    base = {
        "device": str(device),
        "threads": args.threads,
        "batch_size": args.batch_size,
        "num_classes": args.num_classes,
        "train_size": args.train_size,
        "steps": args.steps or STEPS[device.type],
        "warmup": WARMUP[device.type] if args.warmup is None else args.warmup,
        "in_process": args.small,
    }
    if args.threads:
        torch.set_num_threads(args.threads)
    payload: dict[str, Any] = {
        **environment(device),
        "batch_size": args.batch_size,
        "packs": packs,
        "steps": base["steps"],
        "timing": "process CPU time" if device.type == "cpu" else "wall time",
        "configs": [],
    }
    with tempfile.TemporaryDirectory(prefix="searchkd-pack-") as tmp:
        for name in names:
            payload["configs"].append(run_config(name, packs, base, Path(tmp), report))
    print(table(payload))
    return payload


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return finish(run(args), args.json)


if __name__ == "__main__":
    raise SystemExit(main())
