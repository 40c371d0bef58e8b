"""Is a search's winner really better than its objective's defaults? One digits search per
objective.

    python bench/final_objectives.py                        # every registered objective
    python bench/final_objectives.py --objectives msd,kd --trials 6 --json final.json
    python bench/final_objectives.py --search trials/NAME --seeds 3   # a finished search's

For each objective (from the registry: a new one is benchmarked without an edit here), the
space is spaces/digits-ce.yaml with that objective, its own tunables searched over their
default ranges (`searchkd objectives` lists them; the label terms' weights included), TPE,
no early stopping, and a `final:` section: when the search ends, its best config and the
objective's default config are retrained on train + val with the same seeds and compared on
test, paired by seed (`searchkd.api.final`). Everything goes through `searchkd.tune`, the
function behind `searchkd tune`. The table gives, per objective, the search's best val_acc,
the final stage's test accuracy of the winner and of the default (mean ± std over the seeds),
the paired difference with its 95% interval, and the verdict.

The teacher is the quickstart's, trained at most once into `--teacher-trials-dir`'s cache.

`--search DIR` (repeatable) runs no search: it runs the final stage of a search another run
finished (`searchkd final DIR --top 1 --seeds S`), e.g. one of bench/search_efficiency.py's
TPE + ASHA searches on Fashion-MNIST, and gives the same row for it.
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
    share_teacher,
    space_of,
)

import searchkd  # noqa: E402
from searchkd.analysis import read_spec  # noqa: E402
from searchkd.objectives import OBJECTIVES  # noqa: E402
from searchkd.record import read_final  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def searched_space(
    objective: str, base: Path, trials: int, seeds: int, overrides: list[str] | None = None
) -> dict[str, Any]:
    """The base space with `objective`, its tunables searched, and a final stage."""
    raw = space_of(objective, base, overrides=overrides or ())
    raw["name"] = f"final-{objective}"
    params = {
        f"loss.{k}": dict(t.search)
        for k, t in OBJECTIVES.get(objective).tunables.items()
        if t.search
    }
    raw["params"] = params
    raw["search"] = {**raw["search"], "num_samples": trials, "sampler": "tpe", "scheduler": "none"}
    raw["final"] = {"top": 1, "seeds": seeds}
    return raw


def row_of(
    objective: str, summary: dict[str, Any], best_val: float, seconds: float
) -> dict[str, Any]:
    winner = next((c for c in summary["configs"] if c["rank"] == 1), None)
    default = next(c for c in summary["configs"] if c["is_default"])
    diff = (winner or {}).get("diff") or {}
    return {
        "objective": objective,
        "best_val_acc": best_val,
        "seconds": seconds,
        "winner": winner
        and {"mean": winner["mean"], "std": winner["std"], "trial": winner["trial_number"]},
        "default": {"mean": default["mean"], "std": default["std"]},
        "diff": diff,
        "verdict": (winner or {}).get("verdict", "the winner is the default"),
    }


def pct(mean: float | None, std: float | None = None) -> str:
    if mean is None:
        return "-"
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| objective | search best val_acc (%) | winner test (%) | default test (%) | "
        "Δ (pp) [95% CI] | verdict | wall (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        w, d, diff = r["winner"] or {}, r["default"], r["diff"]
        ci = (
            f"{100 * diff['mean']:+.2f} [{100 * diff['low']:+.2f}, {100 * diff['high']:+.2f}]"
            if diff.get("low") is not None
            else "-"
        )
        lines.append(
            f"| {r['objective']} | {pct(r['best_val_acc'])} | {pct(w.get('mean'), w.get('std'))} | "
            f"{pct(d['mean'], d['std'])} | {ci} | {r['verdict']} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def final_of(search: Path, seeds: int, num_cpus: int) -> dict[str, Any]:
    """The final stage (`searchkd final SEARCH --top 1 --seeds S`) of a search another run
    finished (a search benchmark's TPE search): its row, the search's best val_acc being its
    winner's recorded score."""
    search = search.expanduser().resolve()
    objective = read_spec(search).objectives[0]
    print(f"searchkd final {search.name} --top 1 --seeds {seeds} ...", flush=True)
    start = time.perf_counter()
    run = searchkd.api.final(search, top=1, seeds=seeds, num_cpus=num_cpus, say=lambda _: None)
    seconds = time.perf_counter() - start
    summary = read_final(search)
    if run.status != "finished" or summary is None:
        raise SystemExit(f"{search.name}: its final stage ended {run.status}")
    winner = next((c for c in summary["configs"] if c["rank"] == 1), {})
    row = row_of(objective, summary, winner.get("score", float("nan")), seconds)
    return {"search": search.name, **row}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--objectives", default=",".join(OBJECTIVES.names()))
    p.add_argument(
        "--search",
        type=Path,
        action="append",
        help="instead of new searches: the final stage of this finished search (repeatable)",
    )
    p.add_argument("--trials", type=int, default=8, help="trials per search")
    p.add_argument("--seeds", type=int, default=3, help="seeds per config in the final stage")
    p.add_argument("--epochs", type=int, help="epochs per trial (default: the base space's)")
    p.add_argument("--base", type=Path, default=ROOT / "spaces" / "digits-ce.yaml")
    add_search_options(p)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local Ray, as in the tests
    names = [n.strip() for n in args.objectives.split(",") if n.strip()]
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        raise SystemExit(
            f"unknown objective {unknown[0]!r}; known: {', '.join(OBJECTIVES.names())}"
        )
    env = environment()
    if args.search:
        rows = [final_of(search, args.seeds, args.num_cpus) for search in args.search]
        settings = {"searches": [str(s) for s in args.search], "seeds": args.seeds}
        env.update(load_average_1m_end=os.getloadavg()[0])
        return finish(table(rows), env, args.json, {"settings": settings, "rows": rows})
    trials = args.trials_dir or Path(tempfile.mkdtemp(prefix="searchkd-final-"))
    trials.mkdir(parents=True, exist_ok=True)
    share_teacher(
        space_of("ce", args.base, overrides=args.override),
        args.teacher_trials_dir.expanduser(),
        trials,
    )
    rows = []
    for objective in names:
        raw = searched_space(objective, args.base, args.trials, args.seeds, args.override)
        if args.epochs:
            raw["train"] = {**raw["train"], "epochs": args.epochs}
        print(
            f"searchkd.tune(final-{objective}): {args.trials} trials, then the final stage ...",
            flush=True,
        )
        start = time.perf_counter()
        run = searchkd.tune(
            raw, trials_dir=trials, num_cpus=args.num_cpus, report=False, say=lambda _: None
        )
        seconds = time.perf_counter() - start
        summary = read_final(run.search_dir)
        if run.status != "finished" or run.final_status != "finished" or summary is None:
            raise SystemExit(
                f"final-{objective}: the search ended {run.status}, its final stage "
                f"{run.final_status}"
            )
        best = run.summary.best_value if run.summary else float("nan")
        rows.append(row_of(objective, summary, best, seconds))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    settings = {
        "base": str(args.base),
        "trials": args.trials,
        "seeds": args.seeds,
        "epochs": args.epochs,
    }
    return finish(table(rows), env, args.json, {"settings": settings, "rows": rows})


if __name__ == "__main__":
    raise SystemExit(main())
