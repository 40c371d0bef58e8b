"""Does each objective beat the student alone? One real search per objective on the bundled digits.

    python bench/digits_objectives.py                      # every registered objective,
                                                           # ~5 min on 2 cores
    python bench/digits_objectives.py --objectives ce,kd   # a subset (ce is always added)

Each objective's space is spaces/digits-ce.yaml with its `objective` (and name) replaced, run
through the real search path, `searchkd.tune` (the function behind `searchkd tune`): Ray Tune,
Optuna, MLflow, results.parquet. The objectives come from the registry, so a new objective is
benchmarked without an edit here. The spaces are identical but for the objective (same
teacher, student, recipe, defaults for every loss tunable, no searched params; the shipped
spaces/digits-<objective>.yaml are these, a test checks it) and hold 3 trials each whose
seeds derive from the search seed and the trial number, so trial k starts from the same
initialisation under every objective. The figure of a trial is the `test_acc`
of its last epoch row: the test accuracy of its best-on-val student. The table gives the
mean ± sample std over the 3 seeds, the paired mean difference to ce, and whether the
objective beats ce (a higher mean).

The teacher is the quickstart's (same data, recipe and search seed). It is trained at most
once, by `searchkd.api.teacher` into the cache of `--teacher-trials-dir` (default ./trials, the
one `searchkd tune spaces/quickstart.yaml` fills), and the searches, which go to a temporary
trials directory unless `--trials-dir`, reach that cache through a `teachers` symlink.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

import searchkd
from searchkd.objectives import OBJECTIVES

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "ce"
EPS = 1e-9  # accuracies closer than this are the same count of test images


@dataclass
class Row:
    """One objective's 3 seeds: per-seed test accuracy (by trial number), summary, wall time."""

    objective: str
    test_acc: dict[int, float]
    mean: float
    std: float
    diff_vs_ce: float | None = None
    beats_ce: bool | None = None
    record_vs_ce: str = ""  # per seed: wins/ties/losses against ce
    seconds: float = 0.0


def space_of(objective: str, base: Path) -> dict[str, Any]:
    """The base digits space with only its objective (and name) replaced."""
    raw = yaml.safe_load(base.read_text())
    return {**raw, "name": f"digits-{objective}", "objective": objective}


def share_teacher(space: dict[str, Any], teacher_trials: Path, trials: Path) -> None:
    """Train (once) or find the teacher in `teacher_trials`' cache; link it into `trials`.

    The teacher is trained in its real cache, not through the link: the cache records the
    absolute path of teacher.pt, which must outlive a temporary trials directory.
    """
    searchkd.api.teacher(space, teacher_trials)
    link = trials / "teachers"
    if not link.exists():
        link.symlink_to((teacher_trials / "teachers").resolve(), target_is_directory=True)


def read_test_acc(search_dir: Path) -> dict[int, float]:
    """trial number → test_acc of its last epoch row (the best-on-val student's test accuracy)."""
    rows = searchkd.results(search_dir)  # ordered by trial, then epoch
    last = rows.groupby("trial_number").tail(1)
    return {int(n): float(acc) for n, acc in zip(last.trial_number, last.test_acc, strict=True)}


def summarize(objective: str, accs: dict[int, float], seconds: float) -> Row:
    values = list(accs.values())
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return Row(objective, accs, statistics.fmean(values), std, seconds=seconds)


def compare(rows: list[Row]) -> None:
    """Fill in the paired difference to ce (same trial numbers = same seeds) and beats_ce."""
    base = next(r for r in rows if r.objective == BASELINE)
    for r in rows:
        if r.objective == BASELINE:
            continue
        common = sorted(set(r.test_acc) & set(base.test_acc))
        diffs = [r.test_acc[n] - base.test_acc[n] for n in common]
        mean_diff = statistics.fmean(diffs)
        r.diff_vs_ce = mean_diff if abs(mean_diff) > EPS else 0.0  # no "-0.00" from rounding
        r.beats_ce = r.mean > base.mean + EPS
        won, lost = sum(d > EPS for d in diffs), sum(d < -EPS for d in diffs)
        r.record_vs_ce = f"{won}/{len(diffs) - won - lost}/{lost}"


def table(rows: list[Row]) -> str:
    """The markdown table: accuracies in %, per seed and mean ± std."""
    seeds = sorted({n for r in rows for n in r.test_acc})
    head = [
        "objective",
        "test_acc mean ± std (%)",
        *[f"trial {n}" for n in seeds],
        "Δ vs ce (paired, pp)",
        "seeds won/tied/lost vs ce",
        "beats ce",
        "search wall (s)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r.objective,
            f"{100 * r.mean:.2f} ± {100 * r.std:.2f}",
            *[f"{100 * r.test_acc[n]:.2f}" if n in r.test_acc else "-" for n in seeds],
            "-" if r.diff_vs_ce is None else f"{100 * r.diff_vs_ce:+.2f}",
            r.record_vs_ce or "-",
            "(baseline)" if r.beats_ce is None else ("yes" if r.beats_ce else "no"),
            f"{r.seconds:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cpu_name() -> str:
    """The CPU model and core count the figures were measured on."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model}, {os.cpu_count()} cores"


def environment() -> dict[str, str]:
    """Date, machine, versions and command: OBJECTIVES.md states every figure with these."""
    import torch

    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": cpu_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": shlex.join(["python", *sys.argv]),
    }


def add_search_options(p: argparse.ArgumentParser) -> None:
    """The options every digits benchmark's searches share."""
    p.add_argument(
        "--trials-dir",
        type=Path,
        help="where the searches go (default: a temporary folder, removed)",
    )
    p.add_argument(
        "--teacher-trials-dir",
        type=Path,
        default=Path("trials"),
        help="trials directory whose teachers/ cache holds the teacher (default ./trials)",
    )
    p.add_argument(
        "--num-cpus",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="CPUs of each search's Ray",
    )


def parse_objectives(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        raise SystemExit(
            f"unknown objective {unknown[0]!r}; known: {', '.join(OBJECTIVES.names())}"
        )
    return [BASELINE, *[n for n in names if n != BASELINE]]  # ce first: it is the yardstick


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--objectives",
        default=",".join(OBJECTIVES.names()),
        help="comma-separated (ce is always run)",
    )
    p.add_argument(
        "--base",
        type=Path,
        default=ROOT / "spaces" / "digits-ce.yaml",
        help="the space every objective's is made from",
    )
    add_search_options(p)
    p.add_argument("--json", type=Path, help="also write the figures and the environment here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local Ray, as in the tests
    objectives = parse_objectives(args.objectives)
    env = environment()
    temporary = args.trials_dir is None
    trials = Path(tempfile.mkdtemp(prefix="searchkd-digits-")) if temporary else args.trials_dir
    trials.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    try:
        print(f"teacher: searchkd teacher {args.base} (trained once, then cached) ...", flush=True)
        share_teacher(space_of(BASELINE, args.base), args.teacher_trials_dir.expanduser(), trials)
        for objective in objectives:
            if (trials / f"digits-{objective}").exists():
                raise SystemExit(
                    f"{trials / f'digits-{objective}'} exists: use another --trials-dir"
                )
            print(f"searchkd.tune(digits-{objective}) ...", end=" ", flush=True)
            start = time.perf_counter()
            run = searchkd.tune(
                space_of(objective, args.base),
                trials_dir=trials,
                num_cpus=args.num_cpus,
                report=False,
                say=lambda _: None,
            )
            seconds = time.perf_counter() - start
            if run.status != "finished":
                raise SystemExit(f"digits-{objective}: the search ended {run.status}")
            row = summarize(objective, read_test_acc(trials / f"digits-{objective}"), seconds)
            print(f"{100 * row.mean:.2f} ± {100 * row.std:.2f} % ({seconds:.0f} s)", flush=True)
            rows.append(row)
    finally:
        if temporary:
            shutil.rmtree(trials, ignore_errors=True)
    compare(rows)
    return finish(table(rows), env, args.json, {"rows": [asdict(r) for r in rows]})


def finish(text: str, env: dict[str, Any], path: Path | None, record: dict[str, Any]) -> int:
    """The table, the environment it was measured in, and (with --json) both as JSON."""
    print()
    print(text)
    print()
    for key, value in env.items():
        print(f"{key}: {value}")
    if path:
        path.write_text(json.dumps({"environment": env, **record}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
