"""The library API: what the command line does, as functions a notebook or a benchmark calls.

    import searchkd
    run = searchkd.tune("spaces/quickstart.yaml")          # or a dict, or a Spec
    run = searchkd.resume("trials/quickstart")             # after an interruption
    stage = searchkd.api.final("trials/quickstart")        # is the winner really better?
    rows = searchkd.results("trials/quickstart")           # a DataFrame: one row per trial-epoch
    model = searchkd.load_student("trials/quickstart")     # the best trial's kept student

A mistake the user can fix raises `SearchkdError`, whose lines are what `searchkd` prints
after `searchkd: error:`; nothing is written before such a mistake is found. Progress is
printed as the command line prints it. The command line is a thin shell over this module.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .record import SPACE_FILE, STATE_FILE
from .spec import Spec, SpecError
from .storage import replace_atomically

if TYPE_CHECKING:
    import pandas as pd
    from torch import nn

    from .search import Summary
    from .teacher import TeacherInfo

Say = Callable[[str], None]


class SearchkdError(Exception):
    """A mistake the user can fix: each line is shown as `searchkd: error: <line>`."""

    def __init__(self, *lines: str) -> None:
        super().__init__("; ".join(lines))
        self.lines = list(lines)


@dataclass
class SearchRun:
    """How a `tune` or `resume` call ended: status is finished, interrupted or failed."""

    spec: Spec
    search_dir: Path
    status: str
    summary: Summary | None
    source: str  # the space file (or the search's own copy) a resume command names
    final_status: str | None = None  # how the space's final stage ended, when it has one


@dataclass
class FinalRun:
    """How a `final` call ended: status is finished, interrupted or failed; summary is the
    stage's (per config: test mean ± std, the paired difference to the default, the verdict)."""

    search_dir: Path
    status: str
    summary: dict[str, Any]


def lookups() -> dict[str, Any]:
    """What a space is validated against: the registered objectives (with their tunables),
    models, datasets (with their options) and samplers."""
    from .data import check_dataset_option, dataset_names, dataset_options
    from .models import model_names
    from .objectives import get_objective, objective_names
    from .samplers import SAMPLERS

    def check(objective: str, key: str, value: Any) -> Any:
        return get_objective(objective).tunables[key].check(f"loss.{key}", value)

    return {
        "objectives": {n: set(get_objective(n).tunables) for n in objective_names()},
        "models": model_names(),
        "datasets": dataset_names(),
        "samplers": SAMPLERS.names(),
        "dataset_options": {n: dataset_options(n) for n in dataset_names()},
        "check_tunable": check,
        "check_dataset_option": check_dataset_option,
    }


def load_space(
    space: str | Path | Mapping[str, Any] | Spec,
    storage: str | None = None,
    check_files: bool = True,
) -> Spec:
    """A validated space from a file, a dict or a Spec; `storage` replaces search.storage.
    Paths in it become absolute (a resume from anywhere finds the same files). Without
    `check_files` a missing teacher checkpoint is left to the preflight to report."""
    from . import spec as spec_lib
    from . import storage as storage_lib

    if isinstance(space, Spec):
        space = space.model_dump(mode="json", by_alias=True, exclude_none=True)
    if isinstance(space, Mapping):
        spec = spec_lib.validate(space, "<space>", **lookups())
        source = "<space>"
    else:
        spec = spec_lib.load(space, **lookups())
        source = str(space)
    raw = spec.model_dump(by_alias=True, exclude_none=True)
    if storage is not None:
        raw["search"]["storage"] = storage
    if spec.teacher.checkpoint:
        ckpt = Path(spec.teacher.checkpoint).expanduser().resolve()
        if check_files and not ckpt.is_file():
            raise SpecError(f"{source}: teacher.checkpoint: no such file {ckpt}")
        raw["teacher"]["checkpoint"] = str(ckpt)
    if spec.data.root:
        raw["data"]["root"] = str(Path(spec.data.root).expanduser().resolve())
    if raw["search"].get("storage"):
        raw["search"]["storage"] = storage_lib.normalize(raw["search"]["storage"])
    return Spec.model_validate(raw)


def trials_root(where: str | Path | None = None) -> Path:
    """Where searches live: the argument, else $SEARCHKD_TRIALS_DIR, else ./trials."""
    where = str(where or os.environ.get("SEARCHKD_TRIALS_DIR", "trials"))
    if "://" in where:
        raise SearchkdError(
            f"trials directory {where}: the driver's files (journal, results, MLflow map) live on "
            f"its own disk; put what trials write on {where} with --storage"
        )
    return Path(where).expanduser().resolve()


def search_dir_of(directory: str | Path) -> Path:
    """A search's directory, refused in one line if it is not one."""
    path = Path(directory).expanduser().resolve()
    if not (path / SPACE_FILE).is_file():
        raise SearchkdError(f"{directory}: not a search directory (no {SPACE_FILE})")
    return path


def state_of(search_dir: Path) -> dict[str, Any]:
    """The search's state.json (its status, counts, whether MLflow still waits); {} before it."""
    path = search_dir / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def space_diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """`key: old -> new` for each leaf that differs (what a resume with another space changes)."""
    out: list[str] = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += space_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {json.dumps(a)} -> {json.dumps(b)}")
    return out


def take_lock(search_dir: Path) -> Any:
    """The search's lock (`.NAME.lock` beside it), taken now or refused in one line: one process
    per search, and taken before Ray starts, so a second command is refused at once. The OS
    drops it when its holder dies: a killed run never blocks its resume."""
    from filelock import FileLock, Timeout

    lock_path = search_dir.parent / f".{search_dir.name}.lock"
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise SearchkdError(
            f"{os.path.relpath(search_dir)} is being run by another searchkd process "
            f"(lock {os.path.relpath(lock_path)})"
        ) from None
    return lock


def local_ray_env() -> None:
    """A private local Ray listens on 127.0.0.1 only and reports no usage statistics.

    Ray binds its services to the machine's network address unless it believes it runs on a
    single-node platform; the switch is read when `ray` is first imported, so this runs
    before anything imports it.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def teacher(
    space: str | Path | Mapping[str, Any] | Spec,
    trials_dir: str | Path | None = None,
    spec: Spec | None = None,
    say: Say = print,
) -> TeacherInfo:
    """Train once and cache (or measure) the space's teacher under `<trials_dir>/teachers`."""
    from .data import DatasetNotFound
    from .engine import CheckpointMismatch
    from .teacher import ensure_teacher

    spec = spec or load_space(space)
    try:
        return ensure_teacher(spec, trials_root(trials_dir) / "teachers", log=say)
    except DatasetNotFound as exc:
        raise SearchkdError(f"data.dataset: {exc}") from None
    except CheckpointMismatch as exc:
        raise SearchkdError(f"teacher.checkpoint: {exc}") from None


def tune(
    space: str | Path | Mapping[str, Any] | Spec,
    *,
    trials_dir: str | Path | None = None,
    resume: bool = False,
    address: str | None = None,
    num_cpus: int | None = None,
    tracking_uri: str | None = None,
    storage: str | None = None,
    report: bool = True,
    say: Say = print,
) -> SearchRun:
    """Run a search (or continue it with `resume=True`) and return how it ended."""
    spec = load_space(space, storage, check_files=False)
    source = str(space) if isinstance(space, str | Path) else None
    return _run(
        spec,
        trials_root(trials_dir),
        resume,
        source,
        address=address,
        num_cpus=num_cpus,
        tracking_uri=tracking_uri,
        report=report,
        say=say,
    )


def resume(
    directory: str | Path,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    tracking_uri: str | None = None,
    storage: str | None = None,
    report: bool = True,
    say: Say = print,
) -> SearchRun:
    """Continue the search in `directory` with the space it was started with."""
    search_dir = search_dir_of(directory)
    space = search_dir / SPACE_FILE
    spec = load_space(space, storage, check_files=False)
    return _run(
        spec,
        search_dir.parent,
        True,
        str(space),
        address=address,
        num_cpus=num_cpus,
        tracking_uri=tracking_uri,
        report=report,
        say=say,
    )


def _run(
    spec: Spec,
    root: Path,
    resume: bool,
    source: str | None,
    *,
    address: str | None,
    num_cpus: int | None,
    tracking_uri: str | None,
    report: bool,
    say: Say,
) -> SearchRun:
    if address and num_cpus is not None:
        raise SearchkdError(
            "--num-cpus sets the CPUs of a local Ray; a cluster (--address) has its own"
        )
    search_dir = root / spec.name
    source = source or str(search_dir / SPACE_FILE)
    shown = os.path.relpath(search_dir)
    space_file = search_dir / SPACE_FILE
    if space_file.exists() and not resume:
        raise SearchkdError(
            f"{shown} already exists: add --resume to continue that search, or "
            f"remove it to start over"
        )
    if resume and not space_file.is_file():
        # Killed before the search wrote anything (e.g. while its teacher trained): start it.
        say(f"searchkd: {shown} holds no search yet; starting it")
        resume = False
    if resume:
        import yaml

        stored = Spec.model_validate(yaml.safe_load(space_file.read_text()))
        diff = space_diff(
            stored.model_dump(mode="json", by_alias=True),
            spec.model_dump(mode="json", by_alias=True),
        )
        if diff:
            raise SearchkdError(
                f"{source} differs from the space {shown} was started with: {'; '.join(diff[:3])}"
            )
        if state_of(search_dir).get("status") == "finished":
            say(
                f"searchkd: {shown} is already finished; nothing to resume. "
                f"Compare its trials with: searchkd ui"
            )
            from .report import read_final

            stage = read_final(search_dir)
            if spec.final is not None and (stage is None or not stage.get("complete")):
                say(
                    f"searchkd: its final stage is not finished; continue it with: searchkd final "
                    f"{shown}"
                )
            return SearchRun(spec, search_dir, "finished", None, source)
    from .preflight import check

    problems, warnings = check(spec, root, tracking_uri, address is None, num_cpus)
    if problems:
        raise SearchkdError(*(f"{source}: {p}" for p in problems))
    for warning in warnings:
        print(f"searchkd: warning: {source}: {warning}", file=sys.stderr)
    if address is None:
        local_ray_env()
    root.mkdir(parents=True, exist_ok=True)
    lock = take_lock(search_dir)
    from .driver import SearchError, base_storage, connect
    from .record import ResultsError
    from .search import run_search

    try:
        try:
            connect(spec, address, num_cpus, storage=base_storage(spec, root))
        except SearchError as exc:
            raise SearchkdError(f"{source}: {exc}") from None
        info = teacher(spec, root, spec=spec, say=say)
        search_dir.mkdir(exist_ok=True)
        if not resume:
            replace_atomically(space_file, lambda p: p.write_text(spec.to_yaml()))
        summary, status = run_search(
            spec,
            search_dir,
            root,
            lookups()["objectives"],
            info,
            resume=resume,
            tracking_uri=tracking_uri,
            log=say,
        )
        final_status = None
        if status == "finished" and spec.final is not None and summary is not None:
            from .final import prepare, run_final

            say("")
            stage = prepare(search_dir, spec.final.top, spec.final.seeds)
            final_status = run_final(stage, info, address, num_cpus, log=say)[1]
    except (SearchError, ResultsError) as exc:
        raise SearchkdError(str(exc)) from None
    finally:
        lock.release()
    run = SearchRun(spec, search_dir, status, summary, source, final_status)
    if summary is not None:
        for line in summary_lines(run, root):
            say(line)
        if report:
            write_report(search_dir, after_search=True, say=say)
    return run


def summary_lines(run: SearchRun, root: Path) -> list[str]:
    """What a search prints when it ends: counts, the teacher, the best trial, what next."""
    s, spec = run.summary, run.spec
    assert s is not None
    rel = os.path.relpath(s.search_dir)
    ui = "searchkd ui" + (
        "" if root == trials_root(None) else f" --trials-dir {os.path.relpath(root)}"
    )
    return [
        "",
        f"search {spec.name}: {s.trials} trials ({s.finished} finished, {s.stopped} stopped early "
        f"by ASHA, {s.failed} failed)",
        f"teacher {spec.teacher.arch}: test_acc {s.teacher.test_acc:.4f}",
        f"best trial {s.best_trial}: {spec.metrics[0]} {s.best_value:.4f} (its kept student), "
        f"test_acc {s.test_acc:.4f}",
        "  config: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(s.best_config.items())),
        f"search directory: {rel}  (results.parquet: one row per trial per epoch)",
        f"compare trials:   {ui}   (MLflow UI, experiment {spec.name!r})",
        f"resume:           searchkd tune {run.source} --resume   or   searchkd resume {rel}",
        *final_summary_lines(s.search_dir),
    ]


def final_summary_lines(search_dir: Path) -> list[str]:
    """The final stage's summary, when the search has one (final.parquet)."""
    from .report import FINAL_FILE, final_lines, read_final

    summary = read_final(search_dir)
    if summary is None:
        return []
    return [
        *final_lines(summary),
        f"final stage:      {os.path.relpath(search_dir / FINAL_FILE)}  "
        f"(one row per config and seed)",
    ]


def final(
    search: str | Path,
    *,
    top: int | None = None,
    seeds: int | None = None,
    trials_dir: str | Path | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    say: Say = print,
    trials: Sequence[int] | None = None,
) -> FinalRun:
    """Retrain the search's top `top` configs (or the configs of the trials numbered
    `trials`) and its objective's default on train + val with `seeds` seeds each, and say
    whether the winner really beats the default on test. Runs on Ray Tune and resumes like a
    search: finished runs are never trained again."""
    search_dir = Path(search).expanduser()
    if (
        not (search_dir / SPACE_FILE).is_file()
        and os.sep not in str(search)
        and not search_dir.exists()
    ):
        search_dir = trials_root(trials_dir) / str(search)  # a search's name
    if not (search_dir / SPACE_FILE).is_file():
        raise SearchkdError(
            f"{search}: no such search (no {SPACE_FILE} in {os.path.relpath(search_dir)})"
        )
    search_dir = search_dir.resolve()
    if address is None:
        local_ray_env()
    lock = take_lock(search_dir)
    from .driver import SearchError
    from .final import prepare, run_final
    from .report import ReportError

    try:
        stage = prepare(search_dir, top, seeds, trials)
        # The teacher is read from its cache only when something is left to train.
        info = (
            teacher(stage.spec, search_dir.parent, spec=stage.spec, say=say) if stage.todo else None
        )
        summary, status = run_final(stage, info, address, num_cpus, log=say)
    except (SearchError, ReportError) as exc:
        raise SearchkdError(str(exc)) from None
    finally:
        lock.release()
    return FinalRun(search_dir, status, summary)


def write_report(
    directory: str | Path,
    out: str | Path | None = None,
    mlflow: bool = True,
    after_search: bool = False,
    say: Say = print,
) -> bool:
    """Write the search's report and log it to its parent MLflow run. A report that cannot be
    written, or a tracking store that is away, is one warning line: the search stands. A search
    that just ended without its tracking store is not made to wait for it a second time."""
    from .report import summary_lines as report_lines
    from .report import write_report as write

    search_dir = search_dir_of(directory)
    shown = os.path.relpath(search_dir)
    try:
        report = write(search_dir, out)
    except Exception as exc:  # noqa: BLE001 - the report is a view: it never fails its search
        text = str(exc).strip()
        say(
            f"searchkd: warning: the report of {shown} was not written: "
            f"{text.splitlines()[0] if text else type(exc).__name__}"
        )
        return False
    for line in report_lines(report, final=not after_search):  # the search's summary showed it
        say(line)
    pending = state_of(search_dir).get("tracking_pending", False)
    if mlflow and report.analysis.mlflow and pending and after_search:
        say(
            f"  not logged to MLflow: the tracking store was away when the search ended; the "
            f"resume logs it (or `searchkd report {shown}` once the store is back)"
        )
    elif mlflow and report.analysis.mlflow:
        from .tracking import log_report, one_line

        try:
            run = log_report(search_dir, report.directory)
            say(f"  logged to MLflow: artifacts report/ of the search's run {run}")
        except Exception as exc:  # noqa: BLE001 - a tracking store that is away: one line
            say(
                f"searchkd: warning: the report was not logged to MLflow "
                f"({report.analysis.mlflow['tracking_uri']}): {one_line(exc)}"
            )
    return True


def results(directory: str | Path) -> pd.DataFrame:
    """Every row the search's trials reported, one per trial per epoch, ordered by trial and
    epoch: results.parquet's rows, read from the append-only record (the table may lag behind a
    running search), without writing anything."""
    import pandas as pd

    from .record import read_rows

    search_dir = search_dir_of(directory)
    try:
        rows = read_rows(search_dir)
    except (OSError, ValueError) as exc:  # a damaged results.parquet of a search without its record
        raise SearchkdError(
            f"{search_dir}: results cannot be read: {str(exc).strip().splitlines()[0]}"
        ) from None
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame = frame.sort_values(["trial_number", "epoch"], kind="stable").reset_index(drop=True)
    return frame


def load_student(directory: str | Path, trial: int | None = None) -> nn.Module:
    """The best trial's kept student (or trial `trial`'s), in eval mode on the CPU."""
    from .export import ExportError, best_student
    from .report import ReportError

    try:
        return best_student(search_dir_of(directory), trial).model
    except (ExportError, ReportError) as exc:
        raise SearchkdError(str(exc)) from None
