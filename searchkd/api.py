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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .record import SPACE_FILE, Log, continue_commands, ui_command, write_options
from .record import shown as shown_path
from .spec import Spec, SpecError
from .storage import replace_atomically

if TYPE_CHECKING:
    import pandas as pd
    from torch import nn

    from .search import Summary
    from .teacher import TeacherInfo


def warn(line: str) -> None:
    """A warning line, on stderr (progress and results go to stdout)."""
    print(line, file=sys.stderr)


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


def terminated() -> bool:
    """Whether SIGTERM (rather than Ctrl-C) interrupted a search or final stage here."""
    if "searchkd.driver" not in sys.modules:
        return False
    from .driver import TERMINATED

    return TERMINATED.is_set()


def lookups() -> dict[str, Any]:
    """What a space is validated against: the registered objectives (with their tunables and
    the weights of their terms), models, datasets (with their options) and samplers."""
    from .data import check_dataset_option, dataset_names, dataset_options
    from .models import model_names
    from .objectives import get_objective, objective_names
    from .samplers import SAMPLERS

    def check(objective: str, key: str, value: Any) -> Any:
        return get_objective(objective).tunables[key].check(f"loss.{key}", value)

    return {
        "objectives": {n: set(get_objective(n).tunables) for n in objective_names()},
        "term_weights": {n: get_objective(n).term_weights() for n in objective_names()},
        "models": model_names(),
        "datasets": dataset_names(),
        "samplers": SAMPLERS.names(),
        "dataset_options": {n: dataset_options(n) for n in dataset_names()},
        "check_tunable": check,
        "check_dataset_option": check_dataset_option,
    }


def check_teacher(spec: Spec, source: str | Path) -> None:
    """Refuse a teacher checkpoint that does not load into the declared arch, as `tune` does
    (one line, the preflight's own check)."""
    from .preflight import teacher_problems

    problems = teacher_problems(spec)
    if problems:
        raise SearchkdError(*(f"{source}: {p}" for p in problems))


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
        ckpt = spec_lib.resolve_path(spec.teacher.checkpoint, f"{source}: teacher.checkpoint:")
        problem = spec_lib.checkpoint_problem(ckpt) if check_files else None
        if problem:
            raise SpecError(f"{source}: teacher.checkpoint: {problem}")
        raw["teacher"]["checkpoint"] = str(ckpt)
    if spec.data.root:
        raw["data"]["root"] = str(spec_lib.resolve_path(spec.data.root, f"{source}: data.root:"))
    if raw["search"].get("storage"):
        raw["search"]["storage"] = storage_lib.normalize(raw["search"]["storage"])
    return Spec.model_validate(raw)


def validate_space(space: str | Path | Mapping[str, Any] | Spec) -> Spec:
    """`searchkd validate`: the space as `load_space` validates it, its teacher checkpoint
    loaded into its arch (`check_teacher`), and its teacher and largest students sized
    against this machine: what `tune` refuses before anything is written."""
    from .data import DatasetNotFound
    from .engine import DataShape
    from .preflight import size_problems

    spec = load_space(space)
    check_teacher(spec, str(space) if isinstance(space, str | Path) else "<space>")
    try:
        shape: DataShape | None = DataShape.of(spec, download=False)
    except DatasetNotFound:  # `tune` says so; the models are sized on a nominal shape
        shape = None
    source = str(space) if isinstance(space, str | Path) else "<space>"
    problems = size_problems(spec, shape)
    if problems:
        raise SearchkdError(*(f"{source}: {p}" for p in problems))
    return spec


def trials_root(where: str | Path | None = None) -> Path:
    """Where searches live: the argument, else $SEARCHKD_TRIALS_DIR, else ./trials."""
    from .record import trials_dir_setting

    where = str(where or trials_dir_setting())
    if "://" in where:
        raise SearchkdError(
            f"trials directory {where}: the driver's files (journal, results, MLflow map) live on "
            f"its own disk; put what trials write on {where} with --storage"
        )
    from .spec import resolve_path

    return resolve_path(where, "trials directory")


def search_dir_of(directory: str | Path) -> Path:
    """A search's directory, refused in one line if it is not one."""
    from .spec import resolve_path

    path = resolve_path(directory, "search directory")
    if not (path / SPACE_FILE).is_file():
        raise SearchkdError(f"{directory}: not a search directory (no {SPACE_FILE})")
    return path


def state_of(search_dir: Path, say: Log | None = None) -> dict[str, Any]:
    """The search's state.json (its status, counts, whether MLflow still waits); {} before it
    or when it is damaged (`say` is told in one line)."""
    from .record import read_state

    return read_state(search_dir, say)


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
    say: Log = print,
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
    say: Log = print,
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
        storage=storage,
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
    say: Log = print,
) -> SearchRun:
    """Continue the search in `directory` with the space it was started with."""
    search_dir = search_dir_of(directory)
    space = search_dir / SPACE_FILE
    spec = load_space(space, storage, check_files=False)
    return _run(
        spec,
        search_dir.parent,
        True,
        None,
        address=address,
        num_cpus=num_cpus,
        tracking_uri=tracking_uri,
        storage=storage,
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
    storage: str | None,
    report: bool,
    say: Log,
) -> SearchRun:
    if address and num_cpus is not None:
        raise SearchkdError(
            "--num-cpus sets the CPUs of a local Ray; a cluster (--address) has its own"
        )
    search_dir = root / spec.name
    options = {
        "space": str(Path(source).resolve()) if source and Path(source).is_file() else None,
        "trials_dir": str(root),
        "tracking_uri": tracking_uri,
        "address": address,
        "num_cpus": num_cpus,
        "storage": storage,
    }
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
        from . import spec as spec_lib
        from .record import JOURNAL_FILE, DamagedFile, check_log

        stored = spec_lib.load(space_file)
        try:
            check_log(search_dir / JOURNAL_FILE, "journal")
        except DamagedFile as exc:
            raise SearchkdError(str(exc)) from None
        diff = space_diff(
            stored.model_dump(mode="json", by_alias=True),
            spec.model_dump(mode="json", by_alias=True),
        )
        if diff:
            raise SearchkdError(
                f"{source} differs from the space {shown} was started with: {'; '.join(diff[:3])}"
            )
        if state_of(search_dir, warn).get("status") == "finished":
            say(
                f"searchkd: {shown} is already finished; nothing to resume. "
                f"Compare its trials with: {ui_command(search_dir)}"
            )
            from .record import read_final

            stage = read_final(search_dir)
            if spec.final is not None and (stage is None or not stage.get("complete")):
                say(
                    f"searchkd: its final stage is not finished; continue it with: searchkd final "
                    f"{shown_path(search_dir)}"
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
    from .record import DamagedFile
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
        write_options(search_dir, options)
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
    except (SearchError, DamagedFile) as exc:
        raise SearchkdError(str(exc)) from None
    finally:
        lock.release()
    run = SearchRun(spec, search_dir, status, summary, source, final_status)
    # Said whatever the trials did: a search whose every trial failed has its counts, its
    # errors in the report, and the commands that go on from here like any other.
    for line in summary_lines(run, info):
        say(line)
    if report:
        write_report(search_dir, after_search=True, say=say)
    return run


def summary_lines(run: SearchRun, teacher: TeacherInfo) -> list[str]:
    """What a search prints when it ends: counts, the teacher, the best trial (or why there is
    none), and the commands that go on from here, with the options the search was run with."""
    from .metrics import kept_name

    s, spec = run.summary, run.spec
    rel = os.path.relpath(run.search_dir)
    if s is not None:
        trials, finished, stopped, failed = s.trials, s.finished, s.stopped, s.failed
    else:
        counts = state_of(run.search_dir).get("trials", {})
        finished, stopped = counts.get("finished", 0), counts.get("stopped", 0)
        failed = counts.get("failed", 0)
        trials = sum(counts.values()) if counts else 0
    if s is not None:
        best = [
            f"best trial {s.best_trial}: {kept_name(spec.metrics[0])} {s.best_value:.4f}, "
            f"test_acc {s.test_acc:.4f}",
            "  config: " + ", ".join(f"{k}={shown(v)}" for k, v in sorted(s.best_config.items())),
        ]
    elif failed and failed == trials:
        best = [
            "no best trial: every trial failed (each one's error: searchkd report "
            f"{shown_path(run.search_dir)})"
        ]
    else:
        best = ["no best trial: no trial has reported a score yet"]
    resume = "   or   ".join(continue_commands(run.search_dir))
    return [
        "",
        f"search {spec.name}: {trials} trials ({finished} finished, {stopped} stopped early "
        f"by ASHA, {failed} failed)",
        f"teacher {spec.teacher.arch}: test_acc {teacher.test_acc:.4f}",
        *best,
        f"search directory: {rel}  (results.parquet: one row per trial per epoch)",
        f"compare trials:   {ui_command(run.search_dir)}   (MLflow UI, experiment {spec.name!r})",
        f"resume:           {resume}",
        *final_summary_lines(run.search_dir),
    ]


def continue_command(run: SearchRun) -> str:
    """The command that continues `run`'s search, with the options it was run with."""
    return continue_commands(run.search_dir)[0]


def shown(value: Any) -> str:
    """A config value as a summary prints it: floats to 3 significant digits (the exact ones are
    in results.parquet and `searchkd best`'s config.yaml), the rest as JSON."""
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return "[" + ", ".join(shown(v) for v in value) + "]"
    return json.dumps(value)


def final_summary_lines(search_dir: Path) -> list[str]:
    """The final stage's summary, when the search has one (final.parquet)."""
    from .record import FINAL_FILE, read_final
    from .report import final_lines

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
    report: bool = True,
    say: Log = print,
    trials: Sequence[int] | None = None,
) -> FinalRun:
    """Retrain the search's top `top` configs (or the configs of the trials numbered
    `trials`) and its objective's default on train + val with `seeds` seeds each, and say
    whether the winner really beats the default on test. Runs on Ray Tune and resumes like a
    search: finished runs are never trained again. Then it prints the stage's summary and
    (with `report`) refreshes the search's report, which shows it."""
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
    from .preflight import writable_problem
    from .spec import resolve_path

    search_dir = resolve_path(search_dir, "search directory")
    problem = writable_problem(search_dir, "the search directory")  # final/ is written in it
    if problem:
        raise SearchkdError(f"{problem}; the final stage writes final/ and final.parquet there")
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
    say("")
    for line in final_summary_lines(search_dir):
        say(line)
    if report:
        write_report(search_dir, after_search=True, say=say)
    return FinalRun(search_dir, status, summary)


def write_report(
    directory: str | Path,
    out: str | Path | None = None,
    mlflow: bool = True,
    after_search: bool = False,
    say: Log = print,
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
    pending = state_of(search_dir, say).get("tracking_pending", False)
    if mlflow and report.analysis.mlflow and pending and after_search:
        say(
            f"  not logged to MLflow: the tracking store was away when the search ended; the "
            f"resume logs it (or `searchkd report {shown_path(search_dir)}` once the store is back)"
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
    running search), without writing anything. The trial's config is one column per key,
    `config/<key>` as in Ray Tune's dataframes (`config/loss.tau`, `config/seed`; a list value
    stays a list), in place of the table's one JSON `config` column."""
    import pandas as pd

    from .record import read_rows

    search_dir = search_dir_of(directory)
    try:
        rows = read_rows(search_dir, lambda line: print(line, file=sys.stderr))
    except (OSError, ValueError) as exc:  # a damaged results.parquet of a search without its record
        raise SearchkdError(
            f"{search_dir}: results cannot be read: {str(exc).strip().splitlines()[0]}"
        ) from None
    frame = pd.DataFrame([flat_config(r) for r in rows])
    if not frame.empty:
        frame = frame.sort_values(["trial_number", "epoch"], kind="stable").reset_index(drop=True)
    return frame


def flat_config(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row with its JSON `config` as `config/<key>` columns (a row without one is as it was)."""
    if not isinstance(row.get("config"), str):
        return dict(row)
    out = {k: v for k, v in row.items() if k != "config"}
    out.update({f"config/{k}": v for k, v in sorted(json.loads(row["config"]).items())})
    return out


def load_student(directory: str | Path, trial: int | None = None) -> nn.Module:
    """The best trial's kept student (or trial `trial`'s), in eval mode on the CPU."""
    from .export import ExportError, best_student
    from .report import ReportError

    try:
        return best_student(search_dir_of(directory), trial).model
    except (ExportError, ReportError) as exc:
        raise SearchkdError(str(exc)) from None
