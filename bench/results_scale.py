"""What does keeping results.parquet current cost a long search? A generated 100 × 240 search.

    python bench/results_scale.py                       # 100 trials × 240 epochs, a row every 2 s
    python bench/results_scale.py --trials 20 --epochs 30 --small

The driver records every row a trial reports (`searchkd.results.ResultsTable.add`): one line
appended to results.jsonl, and a rewrite of results.parquet when the table is due. This feeds
it the rows of a generated search (every metric a real trial reports; a row every
`--seconds-per-row` of simulated time, the clock the table reads) and measures, in this one
process, the real time of every rewrite it does, against the rule it replaced: a rewrite at
most every 2 s, i.e. one per row when rows come every 2 s or slower. That rule's cost is not
run (hours); it is the sum of one rewrite's measured cost at each table size, fitted linearly
from rewrites of 1/8, 1/4, 1/2 and all of the rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import environment  # noqa: E402

from searchkd.metrics import REPORTED_METRICS  # noqa: E402
from searchkd.record import RESULTS_FILE, ResultsTable  # noqa: E402

# Every number a trial reports, and the loss terms and scores of an msd search.
METRICS = (
    *REPORTED_METRICS,
    "lr",
    "start_epoch",
    "loss_ce",
    "loss_kd",
    "loss_msd",
    "score",
    "score_val_acc",
)
OLD_EVERY_S = 2.0  # the rule this replaces: rewrite whole when 2 s have passed since the last


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def row(trial: int, epoch: int) -> tuple[dict[str, Any], dict[str, Any]]:
    config = {
        "trial_number": trial,
        "objective": "msd",
        "seed": 1000 + trial,
        "student.width": 0.5,
        "loss.tau": 0.1 + trial / 1000,
        "loss.kd_temperature": 4.0,
        "loss.scales": "[1, 2]",
    }
    result = {m: 0.5 + (trial * 7 + epoch) % 100 / 1000 for m in METRICS}
    result.update(epoch=epoch, start_epoch=0, timestamp=1.7e9 + 10 * epoch + trial)
    return config, result


def run(trials: int, epochs: int, seconds_per_row: float, directory: Path) -> dict[str, Any]:
    clock = Clock()
    table = ResultsTable(directory / RESULTS_FILE, clock=clock)
    sizes: list[int] = []
    seconds: list[float] = []
    write = table.write

    def timed() -> None:
        sizes.append(len(table.rows))
        write()
        seconds.append(table.write_seconds)

    table.write = timed  # type: ignore[method-assign]
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        for trial in range(trials):
            clock.now += seconds_per_row
            config, result = row(trial, epoch)
            table.add(trial, f"t{trial}", config, result)
    table.flush()
    total = time.perf_counter() - start
    rows = trials * epochs
    # One rewrite's cost at a few sizes, for the rule this replaces (one rewrite per row).
    probe = ResultsTable(directory / "probe.parquet", clock=clock)
    points = []
    for part in (8, 4, 2, 1):
        probe.loaded = dict(list(table.rows.items())[: rows // part])
        probe.write()
        points.append((rows // part, probe.write_seconds))
    n = [p[0] for p in points]
    s = [p[1] for p in points]
    mean_n, mean_s = sum(n) / len(n), sum(s) / len(s)
    slope = sum((a - mean_n) * (b - mean_s) for a, b in zip(n, s, strict=True)) / sum(
        (a - mean_n) ** 2 for a in n
    )
    fixed = mean_s - slope * mean_n
    old_writes = (
        rows if seconds_per_row >= OLD_EVERY_S else int(rows * seconds_per_row / OLD_EVERY_S) or 1
    )
    step = rows / old_writes
    old_seconds = sum(fixed + slope * step * (i + 1) for i in range(old_writes))
    return {
        "trials": trials,
        "epochs": epochs,
        "rows": rows,
        "seconds_per_row": seconds_per_row,
        "search_seconds_simulated": clock.now,
        "new": {
            "rewrites": len(sizes),
            "rows_written": sum(sizes),
            "rewrite_seconds": sum(seconds),
            "record_and_rewrite_seconds": total,
            "rows_written_per_row": sum(sizes) / rows,
        },
        "old": {
            "rewrites": old_writes,
            "rows_written": int(sum(step * (i + 1) for i in range(old_writes))),
            "rewrite_seconds_estimated": old_seconds,
            "one_rewrite_seconds": dict((str(a), b) for a, b in points),
        },
        "parquet_mb": (directory / RESULTS_FILE).stat().st_size / 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--epochs", type=int, default=240)
    p.add_argument(
        "--seconds-per-row",
        type=float,
        default=2.0,
        help="simulated time between rows (96 trials on 8 GPUs: about 2 s)",
    )
    p.add_argument(
        "--small", action="store_true", help="(a smoke test's size; no effect on the rule)"
    )
    p.add_argument("--json", type=Path, help="write the figures and the environment here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="searchkd-results-") as tmp:
        r = run(args.trials, args.epochs, args.seconds_per_row, Path(tmp))
    new, old = r["new"], r["old"]
    print(
        f"{r['rows']} rows ({r['trials']} trials × {r['epochs']} epochs), a row every "
        f"{r['seconds_per_row']} s: results.parquet {r['parquet_mb']:.1f} MB"
    )
    print(
        f"  now:    {new['rewrites']:>6} rewrites, {new['rows_written']:>11,} rows written, "
        f"{new['rewrite_seconds']:8.1f} s of rewrites"
    )
    print(
        f"  before: {old['rewrites']:>6} rewrites, {old['rows_written']:>11,} rows written, "
        f"{old['rewrite_seconds_estimated']:8.1f} s of rewrites (estimated from one rewrite's cost)"
    )
    env = environment(torch.device("cpu"))
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "result": r}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
