"""Does a reproducible search decide the same under load and interruption, and what does it cost?

    python bench/reproducibility.py spaces/quickstart.yaml \
        --json bench/results/reproducibility-quickstart-cpu.json
    python bench/reproducibility.py spaces/quickstart.yaml --pack 4 \
        --json bench/results/reproducibility-quickstart-pack4-cpu.json

The space is run through `searchkd tune` (a separate process per run, in its own process
group, on a local Ray of `--num-cpus` CPUs), each run in its own trials directory sharing one
teacher cache:

- `async`: with `search.reproducible: false` (Ray Tune's asynchronous search), for the cost;
- `straight`: as written (reproducible, the default), uninterrupted;
- `loaded`: the same while `--hog` busy-looping processes (started and stopped by PID) load
  the machine;
- `killed`: SIGKILLed (driver, Ray, trials: the whole group) once it has recorded a random
  number of rows (`--kill-seed`; between 15 % and 70 % of the straight run's rows), then
  resumed with `--resume` to the end.

The three reproducible runs must end with the same trials (Optuna params), stop epochs, Optuna
values and best trial. The cost is the idle share of trial slots: over each Ray Tune run (a
killed search has two), slots × the time from its first trial's start to its last trial's end,
less what its trials spent training (each Tune trial's lifetime, from Tune's result.json, less
the `rung_wait_s` it waited at rungs), over slots × time. `--pack K` sets search.pack.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, finish  # noqa: E402

from searchkd.metrics import pick_best  # noqa: E402
from searchkd.search import load_study  # noqa: E402

ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def command(space: Path, trials: Path, cpus: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "searchkd.cli",
        "tune",
        str(space),
        "--trials-dir",
        str(trials),
        "--num-cpus",
        str(cpus),
        *extra,
    ]


def rows(search: Path) -> list[dict[str, Any]]:
    out = []
    path = search / "results.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def outcome(search: Path, name: str, mode: str) -> dict[str, Any]:
    """Each trial's params, stop epoch and Optuna value, and the best trial."""
    study = load_study(search, name)
    table = rows(search)
    trials = {
        t.number: {
            "params": t.params,
            "epochs": max(r["epoch"] for r in table if r["trial_number"] == t.number),
            "stopped_early": t.user_attrs.get("stopped_early"),
            "value": t.value,
            "state": t.state.name,
        }
        for t in study.trials
    }
    scores = {n: t["value"] for n, t in trials.items() if t["value"] is not None}
    return {"trials": trials, "best_trial": pick_best(scores, mode)}


def slot_use(search: Path, slots: int) -> dict[str, float]:
    """Idle share of trial slots over the search's Ray Tune runs (see the module docstring)."""
    total = busy = waited = 0.0
    for run in sorted((search / "ray").glob("run-*")):
        spans = []
        for result in run.glob("*/result.json"):
            lines = [json.loads(x) for x in result.read_text().splitlines() if x.strip()]
            if not lines:
                continue
            end = float(lines[-1]["timestamp"])
            start = end - float(lines[-1]["time_total_s"])
            wait = sum(float(x.get("rung_wait_s", 0.0) or 0.0) for x in lines)
            if "students" in (lines[-1].get("config") or {}):  # a cohort waits as one
                per_epoch: dict[int, float] = {}
                for x in lines:
                    e = int(x.get("epoch", 0))
                    per_epoch[e] = max(per_epoch.get(e, 0.0), float(x.get("rung_wait_s", 0) or 0))
                wait = sum(per_epoch.values())
            spans.append((start, end, wait))
        if not spans:
            continue
        window = max(e for _, e, _ in spans) - min(s for s, _, _ in spans)
        total += slots * window
        busy += sum(e - s - w for s, e, w in spans)
        waited += sum(w for _, _, w in spans)
    return {
        "slot_seconds": total,
        "training_seconds": busy,
        "rung_wait_seconds": waited,
        "idle_share": 1 - busy / total if total else float("nan"),
        "rung_wait_share": waited / total if total else float("nan"),
    }


def run(
    label: str,
    space: Path,
    base: Path,
    teachers: Path,
    cpus: int,
    kill_after_rows: int | None = None,
    hog: int = 0,
) -> dict[str, Any]:
    trials = base / label
    trials.mkdir(parents=True, exist_ok=True)
    link = trials / "teachers"
    if not link.exists():
        link.symlink_to(teachers.resolve(), target_is_directory=True)
    name = yaml.safe_load(space.read_text())["name"]
    hogs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
        for _ in range(hog)
    ]
    start = time.time()
    killed_at = None
    try:
        proc = subprocess.Popen(
            command(space, trials, cpus),
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        if kill_after_rows is not None:
            while len(rows(trials / name)) < kill_after_rows and proc.poll() is None:
                time.sleep(0.2)
            killed_at = {"rows": len(rows(trials / name)), "seconds": time.time() - start}
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            proc = subprocess.Popen(
                command(space, trials, cpus, "--resume"),
                env=ENV,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        rc = proc.wait()
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    mode = yaml.safe_load(space.read_text())["search"].get("mode", "max")
    return {
        "label": label,
        "rc": rc,
        "wall_s": time.time() - start,
        "hog_processes": hog,
        "killed_at": killed_at,
        "load_average_1m_after": os.getloadavg()[0],
        **outcome(trials / name, name, mode),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("space", type=Path)
    p.add_argument("--pack", type=int, default=None, help="search.pack (default: the space's)")
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--hog", type=int, default=2, help="busy processes during the loaded run")
    p.add_argument("--kill-seed", type=int, default=0)
    p.add_argument("--runs", default="async,straight,loaded,killed")
    p.add_argument("--trials-dir", type=Path, default=Path("trials/bench-reproducibility"))
    p.add_argument("--teacher-trials-dir", type=Path, default=Path("trials"))
    p.add_argument("--json", default=None)
    args = p.parse_args()

    raw = yaml.safe_load(args.space.read_text())
    if args.pack:
        raw["search"]["pack"] = args.pack
    pack = int(raw["search"].get("pack", 1))
    raw["name"] = f"{raw['name']}-pack{pack}" if pack > 1 else raw["name"]
    base = args.trials_dir / raw["name"]
    base.mkdir(parents=True, exist_ok=True)
    spaces = {}
    for reproducible in (True, False):
        copy = {**raw, "search": {**raw["search"], "reproducible": reproducible}}
        path = base / f"{raw['name']}-{'reproducible' if reproducible else 'async'}.yaml"
        path.write_text(yaml.safe_dump(copy, sort_keys=False))
        spaces[reproducible] = path
    teachers = args.teacher_trials_dir / "teachers"
    teachers.mkdir(parents=True, exist_ok=True)
    slots = min(int(raw["search"].get("max_concurrent") or args.num_cpus), args.num_cpus)

    results: dict[str, Any] = {}
    wanted = args.runs.split(",")
    for label in wanted:
        if label == "killed":
            total = len(rows(base / "straight" / raw["name"])) or 40
            lo, hi = max(2, int(0.15 * total)), max(3, int(0.7 * total))
            kill = random.Random(args.kill_seed).randint(lo, hi)
        else:
            kill = None
        space = spaces[label != "async"]
        print(f"{label}: running {space} ...", flush=True)
        r = run(
            label,
            space,
            base,
            teachers,
            args.num_cpus,
            kill_after_rows=kill,
            hog=args.hog if label == "loaded" else 0,
        )
        r["slots"] = slot_use(base / label / raw["name"], slots)
        results[label] = r
        print(
            f"{label}: rc {r['rc']}, {r['wall_s']:.0f}s, best trial {r['best_trial']}, "
            f"idle share of {slots} slots {r['slots']['idle_share']:.3f} "
            f"(waiting at rungs {r['slots']['rung_wait_share']:.3f})"
            + (f", killed at {r['killed_at']}" if r["killed_at"] else ""),
            flush=True,
        )
    same = [k for k in ("straight", "loaded", "killed") if k in results]
    decided = {k: (results[k]["trials"], results[k]["best_trial"]) for k in same}
    identical = len({json.dumps(v, sort_keys=True) for v in decided.values()}) == 1
    print(f"reproducible runs {', '.join(same)} identical: {identical}")
    payload = {
        "space": str(args.space),
        "pack": pack,
        "slots": slots,
        "identical": identical,
        "runs": results,
        **environment(torch.device("cpu")),
    }
    return finish(payload, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
