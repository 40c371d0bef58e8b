"""What Ray Tune + MLflow cost a trial: `searchkd tune` against the bare engine, same epochs.

    python bench/overhead.py                          # CUDA if visible: CIFAR-100-sized epochs
    python bench/overhead.py --device cpu --small     # CPU / CI-sized form

Three runs of the same spec (synthetic data, random teacher, one trial, scheduler none):

bare       a fresh process that builds the Engine and runs the long run's epochs with
           run_epoch, nothing else (no checkpoints, no reports); its construction time and
           every epoch's wall time are recorded, so it gives the bare time for any prefix.
search S   `searchkd tune` with 1 trial of the short run's epochs;
search L   the same with the long run's epochs.

A trial's wall time is its MLflow run's lifetime (created when Tune starts the trial, closed
after its last result, artifact and model card are logged: millisecond timestamps kept by
the driver). It includes the actor, the engine's construction, every checkpoint and report,
the driver's round trips and MLflow logging; it excludes Ray's start-up and the search's own
bookkeeping (teacher check, parent run, summary), which are reported apart, per search.

From the two searches: per-epoch overhead = (extra trial time of L − of S) / (epochs L − S),
the fixed per-trial overhead is what remains of S's, and their sum over the recipe's 240
epochs gives a projection of the overhead of a real trial (labelled as a projection).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (the bench folder is not a package)
    BATCH_SIZE,
    NUM_CLASSES,
    PAIRS,
    Pair,
    engine_space,
    environment,
    finish,
    pick_device,
    random_teacher,
)

# Short and long runs. On a GPU the long one is many CIFAR-100-sized epochs so the per-epoch
# cost is measured over tens of seconds; on a CPU a few tiny epochs prove the path works.
EPOCHS = {"cuda": (2, 8), "cpu": (1, 3)}
# Images of the synthetic set: CIFAR-100's 50,000 on a GPU (val_fraction 0.1 holds 5,000 out,
# as a search does); on a CPU a dozen or so batches of 64. Every class needs 6 images for
# val_fraction 0.1 to leave it one validation image (see the check in run()).
TRAIN_SIZE = {"cuda": 50_000, "cpu": 1200}
SMALL_EPOCHS, SMALL_TRAIN_SIZE = (1, 2), 600
VAL_FRACTION = 0.1
TEST_SIZE_FRACTION = 0.2  # CIFAR's test set is a fifth of its training set
RECIPE_EPOCHS = (
    240  # the CIFAR-100 KD recipe of the CRD paper and its successors, for the projection
)
CHECKPOINT_REPEATS = 3  # timed saves of a trial's per-epoch checkpoint (mean reported)


def space(
    pair: Pair,
    teacher: Path,
    name: str,
    epochs: int,
    train_size: int,
    batch_size: int,
    num_classes: int,
    cpus: int,
    gpu: bool,
) -> dict[str, Any]:
    """A one-trial search of the pair on synthetic data: nothing is sampled (params empty)."""
    data = {
        "dataset": "synthetic",
        "val_fraction": VAL_FRACTION,
        "options": {
            "train_size": train_size,
            "num_classes": num_classes,
            "test_size": max(num_classes, int(train_size * TEST_SIZE_FRACTION)),
        },
    }
    raw = engine_space(pair, teacher, data, batch_size, epochs, name=name)
    raw["search"] = {
        "num_samples": 1,
        "scheduler": "none",
        "sampler": "random",
        "max_concurrent": 1,
        "seed": 0,
        "resources": {"cpu": cpus, "gpu": 1 if gpu else 0},
    }
    raw["params"] = {}
    return raw


def bare(space_file: Path, device: str, threads: int) -> dict[str, Any]:
    """The engine alone, as a trial would drive it minus checkpoints and reports."""
    import torch

    from searchkd.engine import Engine
    from searchkd.spec import Spec

    torch.set_num_threads(threads)  # what the trial does with resources.cpu
    spec = Spec.model_validate(yaml.safe_load(space_file.read_text()))
    start = time.perf_counter()
    engine = Engine(spec, seed=0, teacher_checkpoint=spec.teacher.checkpoint, device=device)
    construct = time.perf_counter() - start
    epochs = []
    while not engine.finished:
        t = time.perf_counter()
        engine.run_epoch()
        epochs.append(time.perf_counter() - t)
    # What the trial writes every epoch besides training (searchkd/trial.py): the engine's
    # state and the best student, into a temporary directory Ray then persists.
    with tempfile.TemporaryDirectory(prefix="searchkd-ckpt-") as d:
        t = time.perf_counter()
        for _ in range(CHECKPOINT_REPEATS):
            engine.save(Path(d) / "engine.pt")
            torch.save(engine.best_student, Path(d) / "student_best.pt")
        checkpoint = (time.perf_counter() - t) / CHECKPOINT_REPEATS
    return {"construct_s": construct, "epoch_s": epochs, "checkpoint_s": checkpoint}


def _bare_process(space_file: Path, device: str, threads: int) -> dict[str, Any]:
    start = time.perf_counter()
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--bare-worker",
            str(space_file),
            "--device",
            device,
            "--cpus",
            str(threads),
        ],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"the bare engine failed ({out.returncode}):\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["process_s"] = time.perf_counter() - start
    return row


def _search(space_file: Path, trials: Path, name: str) -> dict[str, Any]:
    """`searchkd tune` in its own process, then the trial's times from MLflow and Ray."""
    from mlflow.tracking import MlflowClient

    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "searchkd.cli",
            "tune",
            str(space_file),
            "--trials-dir",
            str(trials),
            "--num-cpus",
            str(os.cpu_count() or 1),
        ],
        capture_output=True,
        text=True,
    )
    process_s = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"searchkd tune failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    client = MlflowClient(f"sqlite:///{trials / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id])
    child = next(r for r in runs if "mlflow.parentRunId" in r.data.tags)
    results = [
        json.loads(line)
        for f in (trials / name / "ray").rglob("result.json")
        for line in f.read_text().splitlines()
        if line.strip()
    ]
    return {
        "process_s": process_s,
        "trial_wall_s": (child.info.end_time - child.info.start_time) / 1000.0,
        "ray_time_total_s": max(r["time_total_s"] for r in results),
        "ray_epoch_s": [
            r["time_this_iter_s"] for r in sorted(results, key=lambda r: r["training_iteration"])
        ],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = pick_device(args.device)
    short, long = (
        (int(e) for e in args.epochs.split(","))
        if args.epochs
        else (SMALL_EPOCHS if args.small else EPOCHS[device.type])
    )
    if not 0 < short < long:
        raise SystemExit("--epochs SHORT,LONG with 0 < SHORT < LONG")
    train_size = args.train_size or (SMALL_TRAIN_SIZE if args.small else TRAIN_SIZE[device.type])
    if round(train_size / args.num_classes * VAL_FRACTION) < 1:
        raise SystemExit(
            f"--train-size {train_size}: with {args.num_classes} classes and "
            f"val_fraction {VAL_FRACTION} no class keeps a validation image; "
            f"use at least {6 * args.num_classes}"
        )
    pair = PAIRS[args.pair]
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster, as in tests
    with tempfile.TemporaryDirectory(prefix="searchkd-overhead-") as tmp_name:
        tmp = Path(args.keep) if args.keep else Path(tmp_name)
        tmp.mkdir(parents=True, exist_ok=True)
        teacher = random_teacher(pair.teacher, args.num_classes, tmp)
        files = {}
        for label, epochs in (("short", short), ("long", long)):
            files[label] = tmp / f"overhead-{label}.yaml"
            files[label].write_text(
                yaml.safe_dump(
                    space(
                        pair,
                        teacher,
                        f"overhead-{label}",
                        epochs,
                        train_size,
                        args.batch_size,
                        args.num_classes,
                        args.cpus,
                        device.type == "cuda",
                    )
                )
            )
        print(
            f"{pair.label} ({pair.objective}), {train_size} images, batch {args.batch_size}, "
            f"epochs {short} and {long}, {device}",
            flush=True,
        )
        b = _bare_process(files["long"], str(device), args.cpus)
        print(
            f"bare engine: construct {b['construct_s']:.1f} s, epochs "
            + ", ".join(f"{e:.2f}" for e in b["epoch_s"])
            + " s",
            flush=True,
        )
        searches = {
            label: _search(files[label], tmp / "trials", f"overhead-{label}")
            for label in ("short", "long")
        }
    report = summarize(b, searches, short, long)
    _print(report)
    env = environment(device)
    env["torch_threads"] = args.cpus  # the trial's and the bare engine's (resources.cpu)
    return {
        **env,
        "pair": pair.label,
        "objective": pair.objective,
        "train_size": train_size,
        "batch_size": args.batch_size,
        "epochs": [short, long],
        "cpus_per_trial": args.cpus,
        "bare": b,
        "searches": searches,
        **report,
    }


def summarize(
    b: dict[str, Any], searches: dict[str, dict[str, Any]], short: int, long: int
) -> dict[str, Any]:
    """Overheads from the three runs (see the module docstring for what each includes)."""

    def bare_s(epochs: int) -> float:
        return b["construct_s"] + sum(b["epoch_s"][:epochs])

    s, lg = searches["short"], searches["long"]
    extra_short = s["trial_wall_s"] - bare_s(short)
    extra_long = lg["trial_wall_s"] - bare_s(long)
    per_epoch = (extra_long - extra_short) / (long - short)
    fixed = extra_short - short * per_epoch
    steady = b["epoch_s"][1:] or b["epoch_s"]  # the first epoch carries warm-up
    bare_epoch = sum(steady) / len(steady)
    projected_trial = b["construct_s"] + RECIPE_EPOCHS * (bare_epoch + per_epoch) + fixed
    # Robust to noise in the training itself: the time a trial spends outside its function
    # (Ray's round trips, the driver's MLflow logging, the final artifacts), plus the
    # checkpoint the trial writes every epoch. A lower bound: Ray's persisting of each
    # checkpoint inside report() is not in it.
    outside = {k: v["trial_wall_s"] - v["ray_time_total_s"] for k, v in searches.items()}
    return {
        "outside_function_s": outside,
        "overhead_lower_bound_long_pct": 100.0
        * (outside["long"] + long * b["checkpoint_s"])
        / lg["trial_wall_s"],
        "overhead_long_pct": 100.0 * extra_long / lg["trial_wall_s"],
        "overhead_short_pct": 100.0 * extra_short / s["trial_wall_s"],
        "per_epoch_overhead_s": per_epoch,
        "per_epoch_overhead_pct": 100.0 * per_epoch / (bare_epoch + per_epoch),
        "fixed_trial_overhead_s": fixed,
        "bare_epoch_s": bare_epoch,
        "projected_240_epoch_overhead_pct": 100.0
        * (fixed + RECIPE_EPOCHS * per_epoch)
        / projected_trial,
        "search_startup_s": {k: v["process_s"] - v["trial_wall_s"] for k, v in searches.items()},
    }


def _print(r: dict[str, Any]) -> None:
    print(
        f"trial overhead (measured, long run):  {r['overhead_long_pct']:6.1f} % of trial wall time"
    )
    print(f"trial overhead (measured, short run): {r['overhead_short_pct']:6.1f} %")
    print(
        f"per epoch: {r['per_epoch_overhead_s'] * 1000:.0f} ms = {r['per_epoch_overhead_pct']:.1f} "
        f"% of a {r['bare_epoch_s']:.2f} s epoch; fixed per trial: "
        f"{r['fixed_trial_overhead_s']:.1f} s"
    )
    print(
        f"projection for a {RECIPE_EPOCHS}-epoch trial: "
        f"{r['projected_240_epoch_overhead_pct']:.1f} %"
    )
    print(
        "outside the trial's function (Ray round trips, MLflow logging): "
        + ", ".join(f"{k} {v:.2f} s" for k, v in r["outside_function_s"].items())
        + f"; with the per-epoch checkpoints, a lower bound of "
        f"{r['overhead_lower_bound_long_pct']:.1f} % of the long trial"
    )
    print(
        "per search, outside the trial (Ray start, teacher check, runs, summary): "
        + ", ".join(f"{k} {v:.1f} s" for k, v in r["search_startup_s"].items()),
        flush=True,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if visible, else cpu")
    p.add_argument("--pair", default="msd", choices=sorted(PAIRS))
    p.add_argument(
        "--epochs", help=f"SHORT,LONG (default {EPOCHS} by device, {SMALL_EPOCHS} with --small)"
    )
    p.add_argument(
        "--train-size",
        type=int,
        help=f"synthetic images (default {TRAIN_SIZE} by "
        f"device, {SMALL_TRAIN_SIZE} with --small); val_fraction {VAL_FRACTION} of them",
    )
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--num-classes", type=int, default=NUM_CLASSES)
    p.add_argument(
        "--cpus", type=int, default=1, help="search.resources.cpu = the trial's torch threads"
    )
    p.add_argument("--small", action="store_true", help="CI-sized: tiny epochs, proves it runs")
    p.add_argument("--keep", help="keep the searches (trials/, spaces) in this folder")
    p.add_argument("--json", help="write the figures (and device, versions, command, date) here")
    p.add_argument("--bare-worker", help=argparse.SUPPRESS)  # internal: the bare child process
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.bare_worker:
        print(json.dumps(bare(Path(args.bare_worker), args.device, args.cpus)))
        return 0
    return finish(run(args), args.json)


if __name__ == "__main__":
    raise SystemExit(main())
