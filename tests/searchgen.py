"""A search directory made up without running anything: space.yaml, results.parquet with
learning curves, a matching Optuna journal, Tune-less state. For the report's tests and its
measurement on a large search (200 trials × 50 epochs)."""

from __future__ import annotations

import json
import math
import random
import uuid
from pathlib import Path
from typing import Any

import optuna
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from optuna.storages.journal import JournalFileBackend

WIDTH_MACS = {0.25: 60_000.0, 0.5: 190_000.0, 0.75: 430_000.0, 1.0: 760_000.0}
WIDTH_PARAMS = {0.25: 5_200.0, 0.5: 19_800.0, 0.75: 44_000.0, 1.0: 77_700.0}


def space(
    name: str,
    epochs: int,
    trials: int,
    metric: Any = "val_acc",
    mode: Any = "max",
    scheduler: str = "asha",
    objectives: list[str] | None = None,
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "student.width": {"choice": sorted(WIDTH_MACS)},
        "loss.kd_weight": {"float": [0.0, 2.0]},
    }
    if not objectives or "msd" in objectives:
        params["loss.tau"] = {"float": [0.03, 0.5], "log": True}
    return {
        "name": name,
        "objective": {"choice": objectives} if objectives else "msd",
        "data": {"dataset": "digits", "val_fraction": 0.15},
        "teacher": {
            "arch": "resnet8",
            "width": 0.5,
            "train": {"epochs": 3, "batch_size": 64, "lr": 0.1, "lr_schedule": "cosine"},
        },
        "student": {"arch": "resnet8", "width": 0.5},
        "train": {"epochs": epochs, "batch_size": 64, "lr": 0.1, "lr_schedule": "cosine"},
        "loss": {"layers": 1} if not objectives else {},
        "search": {
            "num_samples": trials,
            "metric": metric,
            "mode": mode,
            "scheduler": scheduler,
            "sampler": "nsga2" if isinstance(metric, list) else "tpe",
            "grace_period": max(1, epochs // 9),
            "reduction_factor": 3,
            "seed": 0,
            "resources": {"cpu": 1, "gpu": 0},
        },
        "params": params,
    }


def make_search(
    root: Path,
    name: str = "gen",
    trials: int = 20,
    epochs: int = 12,
    *,
    metric: Any = "val_acc",
    mode: Any = "max",
    scheduler: str = "asha",
    objectives: list[str] | None = None,
    failed: tuple[int, ...] = (),
    running: tuple[int, ...] = (),
    state: str = "finished",
    seed: int = 0,
    stop_fraction: float = 0.5,
) -> Path:
    """Write trials/<name>/ under `root`. Trials not in `running` or `failed` either train all
    epochs or (with ASHA) stop at the first rung: `stop_fraction` of them, the weaker ones."""
    rng = random.Random(seed)
    search = root / name
    search.mkdir(parents=True)
    raw = space(name, epochs, trials, metric, mode, scheduler, objectives)
    (search / "space.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (search / "storage.json").write_text(json.dumps({"uri": None}))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(search / "optuna.journal")))
    metrics = metric if isinstance(metric, list) else [metric]
    modes = mode if isinstance(mode, list) else [mode]
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        directions=["maximize" if m == "max" else "minimize" for m in modes],
    )
    rung = max(1, epochs // 9)
    rows: list[dict[str, Any]] = []
    runs: dict[str, str] = {}
    duration = 2.0
    clock = 1_700_000_000.0
    counts = {"finished": 0, "stopped": 0, "failed": 0, "unfinished": 0}
    for n in range(trials):
        t = study.ask()
        objective = t.suggest_categorical("objective", objectives) if objectives else "msd"
        width = t.suggest_categorical("student.width", sorted(WIDTH_MACS))
        kd_weight = t.suggest_float("loss.kd_weight", 0.0, 2.0)
        config: dict[str, Any] = {
            "student.width": width,
            "loss.kd_weight": kd_weight,
            "seed": 1000 + n,
        }
        if objective == "msd":
            config["loss.tau"] = t.suggest_float("loss.tau", 0.03, 0.5, log=True)
        if objectives:
            config["objective"] = objective
        quality = 0.80 + 0.15 * width**0.5 - 0.04 * abs(kd_weight - 1.0) + rng.uniform(-0.03, 0.03)
        speed = rng.uniform(2.0, 6.0)
        stops = scheduler == "asha" and rng.random() < stop_fraction and n >= 2
        last = epochs if not stops else rung
        if n in running:
            last = max(1, epochs // 2)
        if n in failed:
            last = max(1, epochs // 3)
        trial_id = uuid.UUID(int=rng.getrandbits(128)).hex[:8]
        start = clock + n * duration * 1.3  # trials overlap: rows interleave in time
        best = -math.inf
        test = math.nan
        for e in range(1, last + 1):
            val = min(1.0, quality * (1 - math.exp(-e / speed)) + rng.uniform(-0.01, 0.01))
            test_last = min(1.0, val + rng.uniform(-0.02, 0.01))
            if val > best:
                best, test = val, test_last
            rows.append(
                {
                    "trial_id": trial_id,
                    "trial_number": n,
                    "epoch": e,
                    "val_acc": val,
                    "best_val_acc": best,
                    "val_top5": min(1.0, val + 0.05),
                    "test_acc": test,
                    "test_acc_last": test_last,
                    "train_loss": 2.0 * math.exp(-e / speed),
                    "lr": 0.1,
                    "epoch_seconds": duration,
                    "images_per_second": 500.0,
                    "student_params": WIDTH_PARAMS[width],
                    "objective_params": 1000.0,
                    "student_macs": WIDTH_MACS[width],
                    "start_epoch": 0,
                    "timestamp": start + e * duration,
                    "objective": objective,
                    "config": json.dumps(config, sort_keys=True),
                    "node_id": "n0",
                }
            )
        runs[str(n)] = uuid.UUID(int=rng.getrandbits(128)).hex
        mine = rows[-last:]
        if n in failed:
            t.set_user_attr("searchkd", "failed: non-finite loss at epoch 4")
            study.tell(t, state=optuna.trial.TrialState.FAIL)
            counts["failed"] += 1
        elif n in running:
            counts["unfinished"] += 1
        else:
            values = [float(mine[-1][m]) for m in metrics]
            study.tell(t, values if len(values) > 1 else values[0])
            counts["finished" if last >= epochs else "stopped"] += 1
    table = pa.Table.from_pylist(sorted(rows, key=lambda r: (r["trial_number"], r["epoch"])))
    pq.write_table(table, search / "results.parquet")
    (search / "mlflow_runs.json").write_text(json.dumps(runs))
    (search / "state.json").write_text(
        json.dumps({"status": state, "trials": counts, "time": clock})
    )
    return search


def load_rows(search: Path) -> list[dict[str, Any]]:
    return pq.read_table(search / "results.parquet").to_pylist()
