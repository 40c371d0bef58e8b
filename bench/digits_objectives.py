"""Does each objective beat the student alone, and plain KD? One real search per objective.

    python bench/digits_objectives.py                      # every registered objective on
                                                           # digits, ~5 min on 2 cores
    python bench/digits_objectives.py --objectives ce,kd   # a subset (the baselines are added)
    python bench/digits_objectives.py --base spaces/fashion-objectives.yaml --pack  # any space

Each objective's space is the base space (`--base`, default spaces/digits-ce.yaml) with its
`objective` (and name) replaced, run through the real search path, `searchkd.tune` (the
function behind `searchkd tune`): Ray Tune, Optuna, MLflow, results.parquet. The objectives
come from the registry, so a new objective is benchmarked without an edit here. The spaces are
identical but for the objective (same teacher, student, recipe, defaults for every loss
tunable, no searched params; the shipped spaces/digits-<objective>.yaml are these, a test
checks it) and hold `--seeds` trials (default: the base's num_samples) whose seeds derive from
the search seed and the trial number, so trial k starts from the same initialisation under
every objective: the comparison with each baseline (ce, the student alone, and kd, plain
distillation) is paired by trial number. `--pack` trains an objective's trials as one packed
trial (`search.pack`: one teacher forward per batch for all of them; each student keeps its
own seed, trial number and rows). The figure of a trial is the `test_acc` of its last epoch
row: the test accuracy of its best-on-val student. The table gives the mean with its 95%
t-interval and the sample std over the seeds, and the paired mean difference to each
baseline with its 95% t-interval (`searchkd.final`'s statistics, as the final stage states
them) and the seeds won, tied and lost.

A search that an earlier run finished in the same `--trials-dir` is read again, not rerun:
a run cut short goes on with the objectives it had not done.

The teacher is the base space's (for digits, the quickstart's). It is trained at most once,
by `searchkd.api.teacher` into the cache of `--teacher-trials-dir` (default ./trials, the one
`searchkd tune spaces/quickstart.yaml` fills), and the searches, which go to a temporary
trials directory unless `--trials-dir`, reach that cache through a `teachers` symlink.

The other search benchmarks (search_efficiency.py, final_objectives.py, pareto.py) share this
module's teacher link, options, environment and closing print.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

import searchkd
from searchkd.analysis import read_spec
from searchkd.final import mean_interval, paired_difference
from searchkd.objectives import OBJECTIVES
from searchkd.spec import Spec

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "ce"  # the student alone: the yardstick of every row
BASELINES = ("ce", "kd")  # and plain distillation (Hinton et al.), when registered
EPS = 1e-9  # accuracies closer than this are the same count of test images


@dataclass
class Versus:
    """One objective against one baseline, paired by trial number (= seed)."""

    mean: float  # mean of the per-seed differences
    low: float  # its 95% t-interval (NaN below two seeds)
    high: float
    record: str  # seeds won/tied/lost


@dataclass
class Row:
    """One objective's seeds: per-seed test accuracy (by trial number), summary, wall time."""

    objective: str
    test_acc: dict[int, float]
    mean: float
    std: float
    low: float = float("nan")  # the mean's 95% t-interval
    high: float = float("nan")
    versus: dict[str, Versus] = field(default_factory=dict)  # baseline -> paired difference
    seconds: float = 0.0

    @property
    def diff_vs_ce(self) -> float | None:
        return self.versus[BASELINE].mean if BASELINE in self.versus else None

    @property
    def beats_ce(self) -> bool | None:
        """A higher mean than ce's (None for ce itself)."""
        v = self.versus.get(BASELINE)
        return None if v is None else v.mean > EPS


def load_base(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """A base space file with `--override KEY=VALUE` items written into it: KEY a dotted path
    (teacher.train.epochs), VALUE read as YAML (30, resnet20, {cpu: 4, gpu: 0.25}, null to
    drop the key). One command then runs a benchmark at another size (bench/README.md's GPU
    column) without a second copy of its space."""
    raw = yaml.safe_load(path.read_text())
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--override {item!r}: give KEY=VALUE, e.g. train.epochs=30")
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SystemExit(f"--override {item!r}: {part} is not a section")
        value = yaml.safe_load(text)
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return raw


def space_of(
    objective: str,
    base: Path,
    seeds: int | None = None,
    pack: bool = False,
    overrides: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """The base space (with `overrides`) with only its objective and name replaced (and, if
    asked, its number of trials, all packed into one). The name is the base's with its
    objective swapped (digits-ce → digits-kd), else the base's with the objective appended."""
    raw = load_base(base, overrides)
    name, own = str(raw["name"]), f"-{raw['objective']}"
    stem = name[: -len(own)] if name.endswith(own) else name
    raw = {**raw, "name": f"{stem}-{objective}", "objective": objective}
    if seeds is not None or pack:
        search = dict(raw.get("search") or {})
        if seeds is not None:
            search["num_samples"] = seeds
        if pack:
            search["pack"] = int(search.get("num_samples", 16))
        raw["search"] = search
    return raw


def share_teacher(space: dict[str, Any], teacher_trials: Path, trials: Path) -> None:
    """Train (once) or find the teacher in `teacher_trials`' cache; link it into `trials`.

    The teacher is trained in its real cache, not through the link: the cache records the
    absolute path of teacher.pt, which must outlive a temporary trials directory.
    """
    searchkd.api.teacher(space, teacher_trials)
    link = trials / "teachers"
    if not link.exists():
        link.symlink_to((teacher_trials / "teachers").resolve(), target_is_directory=True)


def finished_before(trials: Path, space: dict[str, Any]) -> float | None:
    """The wall time of the same search finished by an earlier run in `trials` (its marker is
    written once `searchkd.tune` has finished it), or None: a run cut short by a deadline is
    taken up again by the next without retraining what it finished."""
    marker = trials / f"{space['name']}.seconds"
    if not marker.exists():
        return None
    if read_spec(trials / space["name"]) != Spec.model_validate(space):
        raise SystemExit(f"{trials / space['name']} is another search: use another --trials-dir")
    return float(marker.read_text())


def read_test_acc(search_dir: Path) -> dict[int, float]:
    """trial number → test_acc of its last epoch row (the best-on-val student's test accuracy)."""
    rows = searchkd.results(search_dir)  # ordered by trial, then epoch
    last = rows.groupby("trial_number").tail(1)
    return {int(n): float(acc) for n, acc in zip(last.trial_number, last.test_acc, strict=True)}


def summarize(objective: str, accs: dict[int, float], seconds: float) -> Row:
    values = list(accs.values())
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    ci = mean_interval(values)
    return Row(objective, accs, ci.mean, std, ci.low, ci.high, seconds=seconds)


def compare(rows: list[Row]) -> None:
    """Fill in each row's paired difference to each baseline (same trial numbers = same
    seeds), with its 95% t-interval and the seeds won, tied and lost."""
    for base in (r for r in rows if r.objective in BASELINES):
        for r in rows:
            if r is base:
                continue
            d = paired_difference(r.test_acc, base.test_acc)
            diffs = [r.test_acc[n] - base.test_acc[n] for n in set(r.test_acc) & set(base.test_acc)]
            won, lost = sum(x > EPS for x in diffs), sum(x < -EPS for x in diffs)
            mean = d.mean if abs(d.mean) > EPS else 0.0  # no "-0.00" from rounding
            r.versus[base.objective] = Versus(
                mean, d.low, d.high, f"{won}/{len(diffs) - won - lost}/{lost}"
            )


def _interval(mean: float, low: float, high: float, signed: bool = False) -> str:
    fmt = "{:+.2f}" if signed else "{:.2f}"
    text = fmt.format(100 * mean)
    if low == low and high == high:  # not NaN: at least two seeds
        text += f" [{fmt.format(100 * low)}, {fmt.format(100 * high)}]"
    return text


def table(rows: list[Row]) -> str:
    """The markdown table: accuracies in %, per seed, mean [95% CI] and std; per baseline the
    paired difference [95% CI] and the seeds won/tied/lost."""
    seeds = sorted({n for r in rows for n in r.test_acc})
    baselines = [b for b in BASELINES if any(r.objective == b for r in rows)]
    head = [
        "objective",
        "test_acc mean [95% CI] (%)",
        "std",
        *[f"trial {n}" for n in seeds],
        *[
            h
            for b in baselines
            for h in (f"Δ vs {b} (paired, pp) [95% CI]", f"won/tied/lost vs {b}")
        ],
        "search wall (s)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        versus = []
        for b in baselines:
            v = r.versus.get(b)
            versus += (
                ["(baseline)", "-"]
                if v is None
                else [_interval(v.mean, v.low, v.high, True), v.record]
            )
        cells = [
            r.objective,
            _interval(r.mean, r.low, r.high),
            f"{100 * r.std:.2f}",
            *[f"{100 * r.test_acc[n]:.2f}" if n in r.test_acc else "-" for n in seeds],
            *versus,
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


def environment() -> dict[str, Any]:
    """Date, machine, versions of everything on the search path, command, and the load: on a
    shared machine the wall times depend on it, the accuracies do not (the seeds fix them)."""
    import mlflow
    import optuna
    import ray
    import torch

    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": cpu_name(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "optuna": optuna.__version__,
        "mlflow": mlflow.__version__,
        "python": platform.python_version(),
        "command": shlex.join(["python", *sys.argv]),
        "load_average_1m_start": os.getloadavg()[0],
    }


def add_search_options(p: argparse.ArgumentParser) -> None:
    """The options every search benchmark's searches share."""
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
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change the base space (repeatable): a dotted key and a YAML value, e.g. "
        "train.epochs=30 or data.options=null",
    )


def parse_objectives(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        raise SystemExit(
            f"unknown objective {unknown[0]!r}; known: {', '.join(OBJECTIVES.names())}"
        )
    first = [b for b in BASELINES if b in OBJECTIVES]  # the yardsticks come first
    return [*first, *[n for n in names if n not in first]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--objectives",
        default=",".join(OBJECTIVES.names()),
        help=f"comma-separated ({' and '.join(BASELINES)} are always run)",
    )
    p.add_argument(
        "--base",
        type=Path,
        default=ROOT / "spaces" / "digits-ce.yaml",
        help="the space every objective's is made from",
    )
    p.add_argument("--seeds", type=int, help="trials (seeds) per objective (default: the base's)")
    p.add_argument(
        "--pack",
        action="store_true",
        help="train each objective's seeds as one packed trial (one teacher forward per batch)",
    )
    add_search_options(p)
    p.add_argument("--json", type=Path, help="also write the figures and the environment here")
    args = p.parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        p.error("--seeds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local Ray, as in the tests
    objectives = parse_objectives(args.objectives)
    env = environment()
    temporary = args.trials_dir is None
    trials = Path(tempfile.mkdtemp(prefix="searchkd-objectives-")) if temporary else args.trials_dir
    trials.mkdir(parents=True, exist_ok=True)
    spaces = {o: space_of(o, args.base, args.seeds, args.pack, args.override) for o in objectives}
    rows: list[Row] = []
    start = time.perf_counter()
    try:
        done = {o: finished_before(trials, space) for o, space in spaces.items()}
        for o, space in spaces.items():
            if done[o] is None and (trials / space["name"]).exists():
                raise SystemExit(f"{trials / space['name']} exists: use another --trials-dir")
        print(f"teacher: searchkd teacher {args.base} (trained once, then cached) ...", flush=True)
        share_teacher(spaces[objectives[0]], args.teacher_trials_dir.expanduser(), trials)
        for objective, space in spaces.items():
            name = space["name"]
            print(f"searchkd.tune({name}) ...", end=" ", flush=True)
            seconds = done[objective]
            if seconds is None:
                begin = time.perf_counter()
                run = searchkd.tune(
                    space,
                    trials_dir=trials,
                    num_cpus=args.num_cpus,
                    report=False,
                    say=lambda _: None,
                )
                seconds = time.perf_counter() - begin
                if run.status != "finished":
                    raise SystemExit(f"{name}: the search ended {run.status}")
                (trials / f"{name}.seconds").write_text(f"{seconds}\n")
            else:
                print("(finished by an earlier run: read again)", end=" ")
            row = summarize(objective, read_test_acc(trials / name), seconds)
            print(f"{100 * row.mean:.2f} ± {100 * row.std:.2f} % ({seconds:.0f} s)", flush=True)
            rows.append(row)
    finally:
        if temporary:
            shutil.rmtree(trials, ignore_errors=True)
    compare(rows)
    env.update(load_average_1m_end=os.getloadavg()[0], wall_s=time.perf_counter() - start)
    settings = {
        "base": str(args.base),
        "seeds": args.seeds,
        "pack": args.pack,
        "overrides": args.override,
    }
    record = {"settings": settings, "rows": [asdict(r) for r in rows]}
    return finish(table(rows), env, args.json, record)


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
