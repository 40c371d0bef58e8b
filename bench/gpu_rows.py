"""The GPU tables of bench/RESULTS.md, rendered from the JSON of one `bench/gpu.py` run.

    python bench/gpu_rows.py bench/results/gpu-h200.json                 # print the tables
    python bench/gpu_rows.py bench/results/gpu-h200.json --write bench/RESULTS.md
    python bench/gpu_rows.py RUN.json RERUN.json --write bench/RESULTS.md   # a step rerun

The figures land as measured, never retyped: `--write` replaces what RESULTS.md holds between
its `gpu-rows` markers with the tables rendered from the JSON file and names that file in the
opening marker (`tests/test_bench.py` renders it again and compares). A rerun of some steps
(`gpu.py --only`) on the same device replaces those steps; every row names the device, and
the torch version, command and date of the run that measured it; a figure the run did not
measure (a step timed out, failed or was skipped) is shown as such, and a target is judged
only on a measured figure. Only a GPU run may be written: a CPU dry run's figures say
nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

BEGIN = "<!-- gpu-rows:begin source={source} -->"
END = "<!-- gpu-rows:end -->"
BLOCK = re.compile(
    r"<!-- gpu-rows:begin source=(?P<source>\S+) -->\n.*?<!-- gpu-rows:end -->", re.S
)
NONE = "none"  # the source of the tables before any GPU run


def _steps(payload: dict[str, Any] | None) -> dict[str, Any]:
    return (payload or {}).get("steps", {})


def _figure(payload: dict[str, Any] | None, step: str, key: str) -> tuple[Any, str]:
    """(the step's figures under `key`, or None; why not, when None)."""
    record = _steps(payload).get(step)
    if payload is None:
        return None, "not measured yet"
    if record is None:
        return None, "not run"
    figures = record.get("figures", {}).get(key)
    if figures is not None:
        return figures, ""
    status = record.get("status", "not run")
    if status == "done":
        return None, "not in this run"
    why = f"{status}: {record['error']}" if record.get("error") else status
    return None, f"not measured ({why})"


def _keys(payload: dict[str, Any] | None, step: str, first: list[str]) -> list[str]:
    """The keys the tables always show (`first`: those with a target), then any other the
    step measured, in the order it measured them."""
    found = _steps(payload).get(step, {}).get("figures", {})
    return [*first, *(k for k in found if k not in first)]


def _x(value: float) -> str:
    return f"{value:.2f}×"


def _img_s(value: float) -> str:
    return f"{value:,.0f} img/s"


Row = tuple[str, str, str, str, str | None]  # figure, target, measured, met?, the step


def _judge(value: float | None, goal: float | None) -> str:
    if value is None or goal is None:
        return "—"
    return "**met**" if value >= goal else "**not met**"


def throughput_rows(payload: dict[str, Any] | None) -> list[Row]:
    rows: list[Row] = []
    eager_ref: dict[str, float] = {}
    for objective in _keys(payload, "throughput", ["msd", "crd"]):
        r, why = _figure(payload, "throughput", objective)
        name = f"{objective} ({r['pair'].replace('->', '→')})" if r else objective
        ratio_goal, speed_goal = (8.0, 30_000.0) if objective == "msd" else (None, None)
        if r is None:
            rows.append(
                (
                    f"{name} engine vs classic loop, batch 64",
                    "≥ 8×" if ratio_goal else "(none)",
                    why,
                    "—",
                    "throughput",
                )
            )
        else:
            eager_ref[objective] = r["reference"]["img_s"]
            rows.append(
                (
                    f"{name} engine vs classic loop, batch 64",
                    "≥ 8×" if ratio_goal else "(none)",
                    f"{_x(r['ratio'])} ({_img_s(r['engine']['img_s'])} vs "
                    f"{_img_s(r['reference']['img_s'])})",
                    _judge(r["ratio"], ratio_goal),
                    "throughput",
                )
            )
        if objective == "msd":
            rows.append(
                (
                    f"{name} engine, batch 64",
                    "≥ 30,000 img/s",
                    _img_s(r["engine"]["img_s"]) if r else why,
                    _judge(r["engine"]["img_s"] if r else None, speed_goal),
                    "throughput",
                )
            )
        c, why = _figure(payload, "throughput_compile", objective)
        if c is None:
            measured = why
        else:
            measured = _img_s(c["engine"]["img_s"])
            if objective in eager_ref:
                gain = c["engine"]["img_s"] / eager_ref[objective]
                measured += f", {_x(gain)} the eager run's classic loop"
        label = f"{objective} engine with train.compile, batch 64"
        rows.append((label, "(none)", measured, "—", "throughput_compile"))
        b, why = _figure(payload, "throughput_b256", objective)
        measured = (
            f"{_x(b['ratio'])} ({_img_s(b['engine']['img_s'])} vs "
            f"{_img_s(b['reference']['img_s'])})"
            if b
            else why
        )
        label = f"{objective} engine vs classic loop, batch 256"
        rows.append((label, "(none)", measured, "—", "throughput_b256"))
    return rows


def concurrency_rows(payload: dict[str, Any] | None) -> list[Row]:
    rows: list[Row] = []
    for key in _keys(payload, "concurrency", ["trials=2", "trials=4"]):
        k = int(key.removeprefix("trials="))
        if k == 1:
            continue  # the row every other is compared against
        goal = 3.0 if k == 4 else None
        r, why = _figure(payload, "concurrency", key)
        measured = (
            f"{_x(r['speedup_vs_1'])} ({_img_s(r['aggregate_img_s'])} aggregate)" if r else why
        )
        rows.append(
            (
                f"{k} trials sharing the device vs 1, aggregate",
                "≥ 3×" if goal else "(none)",
                measured,
                _judge(r["speedup_vs_1"] if r else None, goal),
                "concurrency",
            )
        )
    return rows


def packing_rows(payload: dict[str, Any] | None) -> list[Row]:
    rows: list[Row] = []
    for name in _keys(payload, "packing", ["msd"]):
        config, why = _figure(payload, "packing", name)
        by_k = {r["k"]: r for r in (config or {}).get("results", [])}
        target = name == "msd"  # the target: msd on resnet32x4 -> resnet8x4, K = 4
        label = (
            f"{config['teacher']} → {config['student']} ({config['objective']})" if config else name
        )
        for k in sorted({*by_k, *((2, 4, 8) if target else ())} - {1}):
            r = by_k.get(k)
            if r is None:
                measured = why or "not measured (the step ended before this K)"
            else:
                measured = (
                    f"{100 * r['efficiency']:.0f} % of ideal ({_x(r['speedup'])} against "
                    f"{_x(r['ideal_speedup'])}, teacher share {config['teacher_share']:.2f})"
                )
            goal = 0.9 if target and k == 4 else None
            rows.append(
                (
                    f"packed trials, {label}, K = {k} vs {k} separate",
                    "≥ 90 % of ideal" if goal else "(none)",
                    measured,
                    _judge(r["efficiency"] if r else None, goal),
                    "packing",
                )
            )
    return rows


def fashion_rows(payload: dict[str, Any] | None) -> list[Row]:
    figures = _steps(payload).get("fashion_mnist", {}).get("figures", {})
    runs = [r for key, r in figures.items() if key != "verdict"]
    what = (
        f"{runs[0]['student']['arch']}, {runs[0]['epochs']} epochs, {runs[0]['train_images']:,} "
        "training images"
        if runs
        else "a short training"
    )
    v, why = _figure(payload, "fashion_mnist", "verdict")
    if v is None or v.get("within_noise") is None:
        measured = why or f"not measured ({v['why']})"
        met = "—"
    else:
        measured = (
            f"bf16 {100 * v['bf16']['mean']:.2f} %, fp32 {100 * v['fp32']['mean']:.2f} % "
            f"(difference {100 * v['difference']:+.2f} points, 2 s.e. "
            f"{200 * v['se_difference']:.2f}; {v['bf16']['seeds']} seeds each)"
        )
        met = "**met**" if v["within_noise"] else "**not met**"
    return [
        (
            f"Fashion-MNIST test accuracy, bf16 + TF32 vs fp32 ({what})",
            "the same within noise",
            measured,
            met,
            "fashion_mnist",
        )
    ]


def overhead_rows(payload: dict[str, Any] | None) -> list[Row]:
    return [
        (
            "Ray + MLflow overhead of a trial",
            "≤ 3 %",
            "not measured: bench/gpu.py runs on the device image, which has neither "
            "(`python bench/overhead.py` on a GPU machine with searchkd installed)",
            "—",
            None,  # measured elsewhere, never by gpu.py: no device of its own
        )
    ]


def memory_rows(payload: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(setting, peak memory of one trial) for every setting the run measured."""
    rows = []
    for step, label in (
        ("throughput", "batch 64"),
        ("throughput_compile", "batch 64, compile"),
        ("throughput_b256", "batch 256"),
    ):
        for objective in _keys(payload, step, []):
            r, _ = _figure(payload, step, objective)
            if r and r["engine"].get("peak_memory_gib") is not None:
                peak = f"{r['engine']['peak_memory_gib']:.2f} GiB"
                rows.append((f"{objective} engine, {r['batch_size']} per batch, {label}", peak))
    for key in _keys(payload, "concurrency", []):
        r, _ = _figure(payload, "concurrency", key)
        if r and all("peak_memory_gib" in p for p in r["per_process"]):
            peak = max(p["peak_memory_gib"] for p in r["per_process"])
            cap = r["per_process"][0]["memory_cap_gib"]
            rows.append(
                (
                    f"{r['procs']} trials sharing the GPU, each",
                    f"{peak:.2f} GiB (cap {cap:.1f} GiB)",
                )
            )
    for name in _keys(payload, "packing", []):
        config, _ = _figure(payload, "packing", name)
        for r in (config or {}).get("results", []):
            peak = f"{r['peak_memory_mib'] / 1024:.2f} GiB"
            rows.append((f"packed cohort {name}, K = {r['k']} (the whole cohort)", peak))
    fashion = _steps(payload).get("fashion_mnist", {}).get("figures", {})
    for key, r in fashion.items():
        if key != "verdict" and "peak_memory_gib" in r:
            arch = r["student"]["arch"]
            rows.append((f"Fashion-MNIST {arch}, {key}", f"{r['peak_memory_gib']:.2f} GiB"))
    return rows


SECTIONS: tuple[Callable[[dict[str, Any] | None], list[Row]], ...] = (
    throughput_rows,
    concurrency_rows,
    overhead_rows,
    packing_rows,
    fashion_rows,
)


def render(payload: dict[str, Any] | None, source: str) -> str:
    """The block between the markers (markers included). Each row gives the torch version,
    command and date of the run that measured it (a step rerun comes from another run)."""
    device = (payload or {}).get("device") or "—"
    lines = [
        BEGIN.format(source=source),
        "| figure | target | measured | target met? | device | torch | command | date |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for section in SECTIONS:
        for figure, target, measured, met, step in section(payload):
            env = _environment(payload, step)
            if step is None or not env:
                where = ["—"] * 4
            else:
                where = [device, env.get("torch", "—"), f"`{env['command']}`", env["date"]]
            lines.append(f"| {figure} | {target} | {measured} | {met} | {' | '.join(where)} |")
    memory = memory_rows(payload)
    if memory:
        lines += [
            "",
            "Peak memory of one trial at each setting (torch's peak allocation on the GPU):",
            "",
        ]
        lines += ["| setting | peak | device |", "|---|---|---|"]
        lines += [f"| {setting} | {peak} | {device} |" for setting, peak in memory]
    lines.append(END)
    return "\n".join(lines)


def _environment(payload: dict[str, Any] | None, step: str | None) -> dict[str, Any]:
    """The environment of the run that measured `step`: its own when it came from a rerun."""
    if payload is None or step is None:
        return {}
    return _steps(payload).get(step, {}).get("environment") or payload.get("environment", {})


def load(paths: list[Path]) -> dict[str, Any]:
    """One run's JSON, or a run and reruns of some of its steps (`gpu.py --only`): a step of
    a later file replaces the earlier one unless only the earlier one is done. Every file
    must come from the same device."""
    runs = [json.loads(path.read_text()) for path in paths]
    merged = runs[0]
    for path, run in zip(paths[1:], runs[1:], strict=True):
        if run.get("device") != merged.get("device"):
            raise SystemExit(
                f"gpu_rows.py: {path} was measured on {run.get('device')}, {paths[0]} on "
                f"{merged.get('device')}: one table is one device"
            )
        for name, record in run.get("steps", {}).items():
            before = merged["steps"].get(name)
            if before and before.get("status") == "done" and record.get("status") != "done":
                continue
            merged["steps"][name] = {**record, "environment": run.get("environment", {})}
        merged["small"] = merged.get("small") or run.get("small")
    return merged


def write(results: Path, payload: dict[str, Any], source: str) -> None:
    text = results.read_text()
    if not BLOCK.search(text):
        raise SystemExit(f"gpu_rows.py: {results} has no {END.split()[1]} markers")
    results.write_text(BLOCK.sub(lambda _: render(payload, source), text, count=1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "json", nargs="+", help="the JSON file of one bench/gpu.py run (then any reruns of steps)"
    )
    p.add_argument("--write", metavar="RESULTS_MD", help="replace the GPU tables in this file")
    args = p.parse_args(argv)
    payload = load([Path(path) for path in args.json])
    source = ",".join(args.json)
    if args.write:
        if payload.get("small") or not (payload.get("environment") or {}).get("gpu"):
            raise SystemExit(
                f"gpu_rows.py: {source} is not a GPU run ({payload.get('device')}"
                f"{', --small' if payload.get('small') else ''}); only a GPU run's figures "
                "go into the GPU tables"
            )
        write(Path(args.write), payload, source)
        print(f"{args.write}: GPU tables rendered from {source} ({payload['device']})")
    else:
        print(render(payload, source))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
