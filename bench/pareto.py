"""Accuracy against size: a two-metric search, its Pareto front, and the final stage on two
points of the front.

    python bench/pareto.py --space spaces/fashion-pareto.yaml --json pareto.json
    python bench/pareto.py --trials 2 --epochs 1 --seeds 2    # smoke, on spaces/digits-pareto.yaml

The space (`--space`, default spaces/digits-pareto.yaml: val_acc up, student MACs down,
NSGA-II, no scheduler, since ASHA stops trials on one metric) is run through `searchkd.tune`,
the function behind `searchkd tune`. The front is the report's own (`searchkd.report.analyze`:
the trials no other trial dominates on both metrics). Two points of it are then retrained by
the final stage, `searchkd final SEARCH --trial A --trial B --seeds S` (`searchkd.api.final`):
the most accurate point of the front and its smallest (fewest MACs); each is compared, seed
by seed on the test split, with the default config (the loss tunables at their objective's
defaults, the student at the space's own arch, width and depth). `--trials` and `--epochs`
override the space's search.num_samples and train.epochs.

The teacher is the space's, trained at most once into `--teacher-trials-dir`'s cache.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits_objectives import (  # noqa: E402
    add_search_options,
    environment,
    finish,
    load_base,
    share_teacher,
)

import searchkd  # noqa: E402
from searchkd.analysis import analyze  # noqa: E402
from searchkd.record import read_final  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SPACE = ROOT / "spaces" / "digits-pareto.yaml"


def front_of(search_dir: Path) -> list[dict[str, Any]]:
    """The Pareto front as the report draws it, by MACs: each point's metrics and config."""
    a = analyze(search_dir)
    m0, m1 = a.spec.metrics[:2]
    points = [
        {
            "trial": t.number,
            m0: t.scores[m0],
            m1: t.scores[m1],
            "test_acc": t.test_acc,
            "student_params": t.student_params,
            "params": t.params,
        }
        for t in a.trials
        if t.number in a.pareto
    ]
    return sorted(points, key=lambda p: p[m1])


def chosen(front: list[dict[str, Any]], m0: str, points: int) -> list[int]:
    """The front's most accurate point, then its smallest, then (for more) the rest by
    accuracy: the ends of the trade-off first."""
    by_acc = sorted(front, key=lambda p: -p[m0])
    order = [by_acc[0]["trial"], front[0]["trial"]] + [p["trial"] for p in by_acc]
    return list(dict.fromkeys(order))[:points]


def pct(x: float | None) -> str:
    return "-" if x is None or x != x else f"{100 * x:.2f}"


def front_table(front: list[dict[str, Any]], m0: str, m1: str) -> str:
    lines = [
        f"| trial | {m0} (%) | {m1} | params | search test_acc (%) | config |",
        "|---|---|---|---|---|---|",
    ]
    for p in front:
        config = ", ".join(f"{k}={v}" for k, v in sorted(p["params"].items()))
        lines.append(
            f"| {p['trial']} | {pct(p[m0])} | {p[m1]:,.0f} | {p['student_params']:,.0f} | "
            f"{pct(p['test_acc'])} | {config} |"
        )
    return "\n".join(lines)


def final_table(summary: dict[str, Any], front: list[dict[str, Any]], m1: str) -> str:
    """Per retrained config: its MACs (from the search), test mean ± std over the seeds, the
    paired difference to the default with its interval, the verdict."""
    macs = {p["trial"]: p[m1] for p in front}
    lines = [
        f"| config | trial | {m1} | final test (%) mean ± std | Δ vs default (pp) [95% CI] | "
        "verdict |",
        "|---|---|---|---|---|---|",
    ]
    for c in summary["configs"]:
        d = c.get("diff") or {}
        ci = (
            f"{100 * d['mean']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}]"
            if d.get("low") is not None and d["low"] == d["low"]
            else "-"
        )
        n = c["trial_number"]
        lines.append(
            f"| {c['label']} | {'-' if n is None else n} | "
            f"{f'{macs[n]:,.0f}' if n in macs else '-'} | {pct(c['mean'])} ± {pct(c['std'])} | "
            f"{ci} | {c.get('verdict', '-')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--space", type=Path, default=SPACE, help="a two-metric space")
    p.add_argument("--trials", type=int, help="search.num_samples (default: the space's)")
    p.add_argument("--epochs", type=int, help="train.epochs (default: the space's)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per config in the final stage")
    p.add_argument("--points", type=int, default=2, help="points of the front to retrain")
    add_search_options(p)
    p.add_argument("--json", type=Path, help="also write the front, the final stage and more")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local Ray, as in the tests
    raw = load_base(args.space, args.override)
    if args.trials:
        raw["search"] = {**raw.get("search", {}), "num_samples": args.trials}
    if args.epochs:
        raw["train"] = {**raw.get("train", {}), "epochs": args.epochs}
    metrics = raw.get("search", {}).get("metric")
    if not isinstance(metrics, list) or len(metrics) != 2:
        raise SystemExit(
            f"{args.space}: search.metric must name two metrics, e.g. [val_acc, student_macs]"
        )
    m0, m1 = metrics
    env = environment()
    trials = args.trials_dir or Path(tempfile.mkdtemp(prefix="searchkd-pareto-"))
    trials.mkdir(parents=True, exist_ok=True)
    search_dir = trials / raw["name"]
    if search_dir.exists():
        raise SystemExit(f"{search_dir} exists: use another --trials-dir")
    share_teacher(raw, args.teacher_trials_dir.expanduser(), trials)
    print(f"searchkd.tune({raw['name']}) ...", flush=True)
    start = time.perf_counter()
    run = searchkd.tune(
        raw, trials_dir=trials, num_cpus=args.num_cpus, report=False, say=lambda _: None
    )
    search_s = time.perf_counter() - start
    if run.status != "finished":
        raise SystemExit(f"{raw['name']}: the search ended {run.status}")
    front = front_of(search_dir)
    picked = chosen(front, m0, args.points)
    flags = " ".join(f"--trial {n}" for n in picked)
    print(f"front: trials {[p['trial'] for p in front]}; searchkd final {flags} ...", flush=True)
    start = time.perf_counter()
    final = searchkd.api.final(
        search_dir, seeds=args.seeds, trials=picked, num_cpus=args.num_cpus, say=lambda _: None
    )
    final_s = time.perf_counter() - start
    summary = read_final(search_dir)
    if final.status != "finished" or summary is None:
        raise SystemExit(f"{raw['name']}: its final stage ended {final.status}")
    text = (
        f"Pareto front ({len(front)} of {len(analyze(search_dir).trials)} trials), by {m1}:\n\n"
        f"{front_table(front, m0, m1)}\n\nfinal stage on trials {picked}, {args.seeds} seeds:\n\n"
        f"{final_table(summary, front, m1)}"
    )
    env.update(load_average_1m_end=os.getloadavg()[0], search_s=search_s, final_s=final_s)
    settings = {
        "space": str(args.space),
        "trials": raw["search"].get("num_samples"),
        "epochs": raw["train"].get("epochs"),
        "seeds": args.seeds,
        "points": picked,
        "overrides": args.override,
    }
    record = {"settings": settings, "front": front, "final": summary}
    return finish(text, env, args.json, record)


if __name__ == "__main__":
    raise SystemExit(main())
