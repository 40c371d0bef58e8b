"""Is the search better than random? TPE + ASHA against random search on the same budget.

    python bench/search_efficiency.py                  # 3 seeds × 2 searches, 16 trials × 9 epochs
    python bench/search_efficiency.py --small          # smoke: 1 seed, 2 trials × 2 epochs

For every search seed, spaces/digits-efficiency.yaml is run twice through the real search path
(`searchkd.tune`, the function behind `searchkd tune SPACE --trials-dir DIR`: Ray Tune, Optuna,
MLflow, results.jsonl): as written (TPE sampler, ASHA scheduler) and with `sampler: random,
scheduler: none` (random search, every trial trained to the last epoch). Both get the same
trial budget (`--trials`, `--epochs`); the script sets name, search.seed, search.num_samples and
train.epochs in a copy of the space and changes nothing else.

The currency is the trial-epoch: one epoch of one trial, one row of the search's
results.jsonl. Random search spends exactly trials × epochs of them; ASHA spends fewer, since
the trials it stops early report fewer epochs. The rows are replayed in the order the search
recorded them (results.jsonl is appended as each epoch arrives, so concurrent trials
interleave as they ran), and after each one the curve holds the best `best_val_acc` of any
trial so far (the val accuracy of that trial's best-on-val student: the search's own
running best) and that trial's `test_acc` (the test accuracy of the same student, never
used to choose). A trial therefore counts from its first epoch, as the search's progress line
and `student_best.pt` do, not only once it has finished.

The question, issue 11 §4: does TPE + ASHA reach random search's final best val_acc with at
most a third of random's trial-epochs? It is answered per seed (TPE + ASHA with seed s against
random with seed s), over every pair of seeds, and on the mean curves over the seeds (a search
that has ended holds its final best). `--json OUT` writes every curve, figure and the
environment.

`--grace-period N` runs the TPE + ASHA searches with another ASHA grace period (their names
say it). A search that an earlier run finished in the same `--trials-dir` is read again, not
rerun, so a second run with another grace period in the same folder runs only the new TPE +
ASHA searches and compares them with the same random searches.

The teacher is the quickstart's, trained at most once by `searchkd.api.teacher` into the cache of
`--teacher-trials-dir` (default ./trials) and shared with the searches through a `teachers`
link, as bench/digits_objectives.py does. `--small` swaps it for a 3-epoch half-width resnet8
so that the smoke test trains no resnet20.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits_objectives import (  # noqa: E402
    add_search_options,
    environment,
    load_base,
    share_teacher,
)

import searchkd  # noqa: E402
from searchkd.record import read_rows  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SPACE = ROOT / "spaces" / "digits-efficiency.yaml"
METHODS = ("tpe-asha", "random")  # the first is the space as written, the second the baseline
GOAL_FRACTION = 1 / 3  # issue 11 §4: random's final best within a third of its trial-epochs
FRACTIONS = (1 / 9, 1 / 6, 1 / 3, 1 / 2, 2 / 3, 1.0)  # of random's budget, for the table
EPS = 1e-9  # accuracies closer than this are the same count of val images
FULL = {"seeds": "0,1,2", "trials": 16, "epochs": 9}
SMALL = {"seeds": "0", "trials": 2, "epochs": 2}
# --small: a teacher that trains in seconds, so a smoke test costs two short searches only.
SMALL_TEACHER = {
    "arch": "resnet8",
    "width": 0.5,
    "train": {"epochs": 3, "batch_size": 64, "lr": 0.1, "lr_schedule": "cosine"},
}


@dataclass
class Point:
    """The curve after `trial_epochs` epochs: the best trial so far, its val and test accuracy."""

    trial_epochs: int
    val_acc: float
    test_acc: float
    trial: int


@dataclass
class Search:
    """One search's record: what it spent, its curve and where it ended."""

    method: str
    seed: int
    name: str
    seconds: float
    trials: int  # trials that reported at least one epoch
    trial_epochs: int
    epochs_per_trial: dict[int, int]
    stopped_early: int  # trials that reported fewer epochs than the recipe's
    curve: list[Point] = field(default_factory=list)

    @property
    def final(self) -> Point:
        return self.curve[-1]

    def at(self, trial_epochs: int) -> Point:
        """The curve at a count of trial-epochs; a search that has ended holds its final best."""
        k = max(1, min(trial_epochs, len(self.curve)))
        return self.curve[k - 1]

    def reached(self, val_acc: float) -> int | None:
        """Trial-epochs spent when the best val_acc first reached `val_acc` (None: never)."""
        return next((p.trial_epochs for p in self.curve if p.val_acc >= val_acc - EPS), None)


def run_search(space: Path, trials: Path, num_cpus: int) -> float:
    """Run one search through `searchkd.tune`, the function behind `searchkd tune`; its wall
    time, or exit with the reason it did not finish."""
    start = time.perf_counter()
    run = searchkd.tune(
        space, trials_dir=trials, num_cpus=num_cpus, report=False, say=lambda _: None
    )
    if run.status != "finished":
        raise SystemExit(f"{space.stem}: the search ended {run.status}")
    return time.perf_counter() - start


def curve(rows: list[dict[str, Any]]) -> list[Point]:
    """Best val_acc so far (and that trial's test_acc) after each trial-epoch.

    A trial's figure is its `best_val_acc` in its latest row (its best-on-val student) with
    that row's `test_acc` (the same student on the test split). The incumbent changes only
    on a strictly higher val_acc: a later trial that ties it has not improved the search.
    """
    current: dict[int, tuple[float, float]] = {}
    points: list[Point] = []
    best: tuple[float, float, int] | None = None
    for k, r in enumerate(rows, start=1):
        n = int(r["trial_number"])
        current[n] = (float(r["best_val_acc"]), float(r["test_acc"]))
        val, test = current[n]
        # The incumbent's own row always updates it: its best-on-val student may have moved.
        if best is None or val > best[0] + EPS or best[2] == n:
            best = (val, test, n)
        points.append(Point(k, best[0], best[1], best[2]))
    return points


def summarize(
    method: str, seed: int, name: str, rows: list[dict[str, Any]], seconds: float, epochs: int
) -> Search:
    per_trial: dict[int, int] = {}
    for r in rows:
        n = int(r["trial_number"])
        per_trial[n] = per_trial.get(n, 0) + 1
    return Search(
        method,
        seed,
        name,
        seconds,
        len(per_trial),
        len(rows),
        dict(sorted(per_trial.items())),
        sum(e < epochs for e in per_trial.values()),
        curve(rows),
    )


# How a changed search setting is written in a search's name (names are at most 64 characters).
SHORT = {"grace_period": "g", "reduction_factor": "rf", "sampler": "", "scheduler": ""}


def parse_settings(items: list[str]) -> dict[str, Any]:
    """`--set search.KEY=VALUE` items → {KEY: VALUE} (VALUE read as YAML: 3, 2.0, gp)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, _, leaf = key.partition(".")
        if not sep or section != "search" or not leaf:
            raise SystemExit(f"--set {item!r}: give search.KEY=VALUE, e.g. search.grace_period=3")
        out[leaf] = yaml.safe_load(value)
    return out


def tag_of(method: str, settings: dict[str, Any]) -> str:
    """The search's name part for its method and changed settings: tpe-asha-g3-gp."""
    parts = [method] + [f"{SHORT.get(k, k)}{v}" for k, v in settings.items()]
    return "-".join(str(p).replace("_", "").replace(".", "p") for p in parts)


def variant(
    base: dict[str, Any],
    method: str,
    seed: int,
    trials: int,
    epochs: int,
    small: bool,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The base space for one search: TPE + ASHA as written (or with other `search` settings,
    named in the search's name: another grace period, reduction factor, sampler), or random
    search without a scheduler; only the name, seed and budget change besides."""
    space = copy.deepcopy(base)
    space.setdefault("search", {}).update(seed=seed, num_samples=trials)
    space.setdefault("train", {})["epochs"] = epochs
    tag = method
    if method == "random":
        space["search"].update(sampler="random", scheduler="none")
    elif settings:
        space["search"].update(settings)
        tag = tag_of(method, settings)
    space["name"] = f"{base['name']}-{tag}-s{seed}"
    if small:
        space["teacher"] = copy.deepcopy(SMALL_TEACHER)
    return space


def finished(space_file: Path) -> float | None:
    """The wall time of a search an earlier run finished in the same --trials-dir, or None.
    It is written once `searchkd tune` has exited 0, so a search cut short is never read."""
    marker = space_file.with_suffix(".seconds")
    return float(marker.read_text()) if marker.exists() else None


def compare(searches: list[Search], budget: int) -> dict[str, Any]:
    """Per seed, over all pairs of seeds and on the mean curves: the trial-epochs TPE + ASHA
    spent to reach random search's final best val_acc, against the goal of budget / 3."""
    tpe = {s.seed: s for s in searches if s.method == "tpe-asha"}
    rnd = {s.seed: s for s in searches if s.method == "random"}
    goal = budget * GOAL_FRACTION
    per_seed = []
    for seed in sorted(set(tpe) & set(rnd)):
        t, r = tpe[seed], rnd[seed]
        k = t.reached(r.final.val_acc)
        per_seed.append(
            {
                "seed": seed,
                "random_final_val": r.final.val_acc,
                "random_final_test": r.final.test_acc,
                "random_trial_epochs": r.trial_epochs,
                "random_reached_own_final_at": r.reached(r.final.val_acc),
                "tpe_final_val": t.final.val_acc,
                "tpe_final_test": t.final.test_acc,
                "tpe_trial_epochs": t.trial_epochs,
                "tpe_reached_random_final_at": k,
                "tpe_test_when_reached": t.at(k).test_acc if k is not None else None,
                "within_goal": k is not None and k <= goal,
            }
        )
    pairs = [(i, j, tpe[i].reached(rnd[j].final.val_acc)) for i in sorted(tpe) for j in sorted(rnd)]
    horizon = max([budget, *(s.trial_epochs for s in searches)])

    def mean_curve(group: dict[int, Search]) -> list[float]:
        return [
            statistics.fmean(s.at(k).val_acc for s in group.values()) for k in range(1, horizon + 1)
        ]

    mean_random_final = statistics.fmean(s.final.val_acc for s in rnd.values()) if rnd else None
    mean_tpe = mean_curve(tpe) if tpe else []
    k_mean = None
    if mean_random_final is not None:
        k_mean = next(
            (k for k, v in enumerate(mean_tpe, start=1) if v >= mean_random_final - EPS), None
        )
    return {
        "goal_trial_epochs": goal,
        "per_seed": per_seed,
        "pairs": [{"tpe_seed": i, "random_seed": j, "reached_at": k} for i, j, k in pairs],
        "pairs_within_goal": sum(k is not None and k <= goal for _, _, k in pairs),
        "mean_random_final_val": mean_random_final,
        "mean_random_final_test": (
            statistics.fmean(s.final.test_acc for s in rnd.values()) if rnd else None
        ),
        "mean_tpe_final_val": statistics.fmean(s.final.val_acc for s in tpe.values())
        if tpe
        else None,
        "mean_tpe_final_test": statistics.fmean(s.final.test_acc for s in tpe.values())
        if tpe
        else None,
        "mean_tpe_trial_epochs": statistics.fmean(s.trial_epochs for s in tpe.values())
        if tpe
        else None,
        "mean_tpe_reached_mean_random_final_at": k_mean,
        "mean_curves": {"tpe-asha": mean_tpe, "random": mean_curve(rnd) if rnd else []},
        "goal_met_on_means": k_mean is not None and k_mean <= goal,
    }


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def curve_table(searches: list[Search], budget: int) -> str:
    """Best val_acc (its test_acc) after a fraction of random's budget, per search and mean."""
    ks = sorted({max(1, round(budget * f)) for f in FRACTIONS})
    head = [
        "search",
        "seed",
        "trial-epochs spent",
        "trials stopped by ASHA",
        *[f"after {k}" for k in ks],
        "search wall (s)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in METHODS:
        group = [s for s in searches if s.method == method]
        for s in group:
            cells = [
                method,
                str(s.seed),
                str(s.trial_epochs),
                str(s.stopped_early),
                *[f"{pct(s.at(k).val_acc)} ({pct(s.at(k).test_acc)})" for k in ks],
                f"{s.seconds:.0f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        if len(group) > 1:
            cells = [
                f"**{method} mean**",
                "",
                f"{statistics.fmean(s.trial_epochs for s in group):.1f}",
                f"{statistics.fmean(s.stopped_early for s in group):.1f}",
                *[
                    f"{pct(statistics.fmean(s.at(k).val_acc for s in group))} "
                    f"({pct(statistics.fmean(s.at(k).test_acc for s in group))})"
                    for k in ks
                ],
                f"{statistics.fmean(s.seconds for s in group):.0f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reach_table(result: dict[str, Any]) -> str:
    head = [
        "seed",
        "random final best val (test)",
        "random: trial-epochs spent / reached its best at",
        "TPE+ASHA final best val (test)",
        "TPE+ASHA trial-epochs spent",
        "TPE+ASHA reached random's final best at (test then)",
        f"≤ {result['goal_trial_epochs']:.0f}?",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in result["per_seed"]:
        k = p["tpe_reached_random_final_at"]
        cells = [
            str(p["seed"]),
            f"{pct(p['random_final_val'])} ({pct(p['random_final_test'])})",
            f"{p['random_trial_epochs']} / {p['random_reached_own_final_at']}",
            f"{pct(p['tpe_final_val'])} ({pct(p['tpe_final_test'])})",
            str(p["tpe_trial_epochs"]),
            "never" if k is None else f"{k} ({pct(p['tpe_test_when_reached'])})",
            "yes" if p["within_goal"] else "no",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--space", type=Path, default=SPACE, help="the base space (TPE + ASHA as written)"
    )
    p.add_argument(
        "--seeds", help=f"comma-separated search seeds (default {FULL['seeds']}; --small: 0)"
    )
    p.add_argument(
        "--trials", type=int, help=f"trials per search (default {FULL['trials']}; --small: 2)"
    )
    p.add_argument(
        "--epochs", type=int, help=f"epochs per trial (default {FULL['epochs']}; --small: 2)"
    )
    p.add_argument(
        "--small",
        action="store_true",
        help="smoke test: 1 seed, 2 trials × 2 epochs, a 3-epoch resnet8 teacher",
    )
    add_search_options(p)
    p.add_argument(
        "--grace-period",
        type=int,
        help="ASHA's grace period for the TPE + ASHA searches (default: the space's)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="search.KEY=VALUE",
        help="another search setting for the TPE + ASHA searches (repeatable), e.g. "
        "search.reduction_factor=2 or search.sampler=gp; random search keeps the space's",
    )
    p.add_argument("--json", type=Path, help="also write the curves, figures and environment here")
    args = p.parse_args(argv)
    defaults = SMALL if args.small else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.seed_list = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds: comma-separated integers, got {args.seeds!r}")
    if not args.seed_list or args.trials < 1 or args.epochs < 1:
        p.error("--seeds, --trials and --epochs must name at least one seed, trial and epoch")
    args.settings = parse_settings(args.set)
    if args.grace_period is not None:
        args.settings = {"grace_period": args.grace_period, **args.settings}
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local Ray, as in the tests
    base = load_base(args.space, args.override)
    env = environment()
    budget = args.trials * args.epochs
    temporary = args.trials_dir is None
    trials = Path(tempfile.mkdtemp(prefix="searchkd-efficiency-")) if temporary else args.trials_dir
    trials.mkdir(parents=True, exist_ok=True)
    spaces = trials / "efficiency-spaces"
    spaces.mkdir(exist_ok=True)
    searches: list[Search] = []
    start = time.perf_counter()
    try:
        plan = [(seed, method) for seed in args.seed_list for method in METHODS]
        files = {}
        for seed, method in plan:
            space = variant(base, method, seed, args.trials, args.epochs, args.small, args.settings)
            path = spaces / f"{space['name']}.yaml"
            files[(seed, method)] = path
            if finished(path) is not None:
                # The same search, finished by an earlier run in this --trials-dir: read it again
                # (another --grace-period then reruns only the TPE + ASHA searches).
                if yaml.safe_load(path.read_text()) != space:
                    raise SystemExit(
                        f"{path} differs from this run's {space['name']}: use another --trials-dir"
                    )
                continue
            if (trials / space["name"]).exists():
                raise SystemExit(f"{trials / space['name']} exists: use another --trials-dir")
            path.write_text(yaml.safe_dump(space, sort_keys=False))
        print("teacher: searchkd teacher (trained once, then cached) ...", flush=True)
        share_teacher(
            yaml.safe_load(files[plan[0]].read_text()), args.teacher_trials_dir.expanduser(), trials
        )
        for seed, method in plan:
            path = files[(seed, method)]
            name = path.stem
            print(
                f"searchkd tune {name} ({args.trials} trials × {args.epochs} epochs) ...",
                end=" ",
                flush=True,
            )
            seconds = finished(path)
            if seconds is None:
                seconds = run_search(path, trials, args.num_cpus)
                path.with_suffix(".seconds").write_text(f"{seconds}\n")
            else:
                print("(finished by an earlier run: read again)", end=" ")
            s = summarize(
                method, seed, name, read_rows(trials / name), seconds, args.epochs
            )  # in recorded order
            searches.append(s)
            print(
                f"{s.trial_epochs} trial-epochs, best val {pct(s.final.val_acc)} "
                f"(test {pct(s.final.test_acc)}), {seconds:.0f} s",
                flush=True,
            )
    finally:
        if temporary:
            shutil.rmtree(trials, ignore_errors=True)
    wall = time.perf_counter() - start
    result = compare(searches, budget)
    env.update(load_average_1m_end=os.getloadavg()[0], wall_s=wall)
    print()
    print(
        f"best val_acc % (its test_acc %) after N trial-epochs; random's budget {args.trials} "
        "trials "
        f"× {args.epochs} epochs = {budget}; a search that has ended holds its final best"
    )
    print(curve_table(searches, budget))
    print()
    print(reach_table(result))
    print()
    k = result["mean_tpe_reached_mean_random_final_at"]
    print(
        f"mean over seeds: random's final best val {pct(result['mean_random_final_val'])}; the "
        "mean TPE+ASHA "
        f"curve reaches it at {'never' if k is None else k} trial-epochs (goal ≤ "
        f"{result['goal_trial_epochs']:.0f}): "
        f"{'met' if result['goal_met_on_means'] else 'not met'}; "
        f"pairs of seeds within the goal: {result['pairs_within_goal']} of {len(result['pairs'])}"
    )
    print(f"whole benchmark: {wall:.0f} s")
    for key, value in env.items():
        print(f"{key}: {value}")
    if args.json:
        payload = {
            "environment": env,
            "settings": {
                "space": str(args.space),
                "seeds": args.seed_list,
                "trials": args.trials,
                "epochs": args.epochs,
                "budget_trial_epochs": budget,
                "small": args.small,
                "grace_period": args.grace_period,
                "tpe_settings": args.settings,
                "overrides": args.override,
            },
            "searches": [asdict(s) for s in searches],
            **result,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
