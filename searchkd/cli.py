"""`searchkd` on the command line: tune, resume, final, report, best, validate, objectives, ui.

Every mistake a user can cause ends as one line, `searchkd: error: ...`, exit 2, before
anything is written.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .spec import Spec, SpecError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # what a shell reports for a program ended by Ctrl-C


class UserError(Exception):
    """Shown as `searchkd: error: <message>` with exit 2."""


def fail(message: str) -> NoReturn:
    print(f"searchkd: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def _lookups() -> dict[str, Any]:
    from .data import dataset_names, dataset_options
    from .models import model_names
    from .objectives import get_objective, objective_names

    def check(objective: str, key: str, value: Any) -> Any:
        return get_objective(objective).tunables[key].check(f"loss.{key}", value)

    return {
        "objectives": {n: set(get_objective(n).tunables) for n in objective_names()},
        "models": model_names(),
        "datasets": dataset_names(),
        "dataset_options": {n: dataset_options(n) for n in dataset_names()},
        "check_tunable": check,
    }


def load_space(path: str | Path, storage: str | None = None, check_files: bool = True) -> Spec:
    """Load and validate a space; `storage` (the --storage option) replaces search.storage.
    Without `check_files` a missing teacher checkpoint is left to the preflight to report."""
    from . import spec as spec_lib
    from . import storage as storage_lib

    spec = spec_lib.load(path, **_lookups())
    if storage is not None:
        raw = spec.model_dump(by_alias=True, exclude_none=True)
        raw["search"]["storage"] = storage
        spec = Spec.model_validate(raw)
    # Paths in a space are relative to the working directory; store them absolute so a
    # resume from anywhere (`searchkd resume trials/x`) finds the same files.
    updates: dict[str, Any] = {}
    if spec.teacher.checkpoint:
        ckpt = Path(spec.teacher.checkpoint).expanduser().resolve()
        if check_files and not ckpt.is_file():
            raise SpecError(f"{path}: teacher.checkpoint: no such file {ckpt}")
        updates["teacher"] = {**spec.teacher.model_dump(exclude_none=True), "checkpoint": str(ckpt)}
    if spec.data.root:
        updates["data"] = {**spec.data.model_dump(), "root": str(Path(spec.data.root).expanduser().resolve())}
    if spec.search.storage and storage_lib.normalize(spec.search.storage) != spec.search.storage:
        updates["search"] = {**spec.search.model_dump(), "storage": storage_lib.normalize(spec.search.storage)}
    if updates:
        raw = spec.model_dump(by_alias=True, exclude_none=True)
        raw.update(updates)
        spec = Spec.model_validate(raw)
    return spec


def _diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out: list[str] = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        where = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, where + ".")
        elif a != b:
            out.append(f"{where}: {json.dumps(a)} -> {json.dumps(b)}")
    return out


def trials_root(arg: str | None) -> Path:
    where = arg or os.environ.get("SEARCHKD_TRIALS_DIR", "trials")
    if "://" in where:
        fail(f"trials directory {where}: the driver's files (journal, results, MLflow map) live on its "
             f"own disk; put what trials write on {where} with --storage")
    return Path(where).expanduser().resolve()


def cmd_tune(args: argparse.Namespace) -> int:
    spec = load_space(args.space, args.storage, check_files=False)
    root = trials_root(args.trials_dir)
    return _tune(spec, root, resume=args.resume, args=args, source=args.space)


def cmd_resume(args: argparse.Namespace) -> int:
    from .search import SPACE_FILE

    search_dir = Path(args.directory).expanduser().resolve()
    space = search_dir / SPACE_FILE
    if not space.is_file():
        fail(f"{args.directory}: not a search directory (no {SPACE_FILE})")
    spec = load_space(space, args.storage, check_files=False)
    return _tune(spec, search_dir.parent, resume=True, args=args, source=str(space))


def _tune(spec: Spec, root: Path, resume: bool, args: argparse.Namespace, source: str) -> int:
    if args.address and args.num_cpus is not None:
        fail("--num-cpus sets the CPUs of a local Ray; a cluster (--address) has its own")
    search_dir = root / spec.name
    shown = os.path.relpath(search_dir)
    space_file = search_dir / "space.yaml"
    if space_file.exists() and not resume:
        fail(f"{shown} already exists: add --resume to continue that search, or remove it to start over")
    if resume and not space_file.is_file():
        # Killed before the search wrote anything (e.g. while its teacher trained): start it.
        print(f"searchkd: {shown} holds no search yet; starting it")
        resume = False
    if resume:
        stored = Spec.model_validate(_read_yaml(space_file))
        diff = _diff(stored.model_dump(mode="json", by_alias=True), spec.model_dump(mode="json", by_alias=True))
        if diff:
            fail(f"{source} differs from the space {shown} was started with: {'; '.join(diff[:3])}")
        if _status(search_dir) == "finished":
            print(f"searchkd: {shown} is already finished; nothing to resume. "
                  f"Compare its trials with: searchkd ui")
            from .report import read_final

            final = read_final(search_dir)
            if spec.final is not None and (final is None or not final.get("complete")):
                print(f"searchkd: its final stage is not finished; continue it with: searchkd final {shown}")
            return 0
    from .preflight import check

    problems, warnings = check(spec, root, args.tracking_uri, args.address is None, args.num_cpus)
    for problem in problems:
        print(f"searchkd: error: {source}: {problem}", file=sys.stderr)
    if problems:
        raise SystemExit(EXIT_USAGE)
    for warning in warnings:
        print(f"searchkd: warning: {source}: {warning}", file=sys.stderr)
    if args.address is None:
        local_ray_env()
    from filelock import FileLock, Timeout

    # One process per search, and the lock comes before Ray starts, so a second command is
    # refused at once. The OS drops it when its holder dies: a killed run never blocks.
    root.mkdir(parents=True, exist_ok=True)
    lock_path = root / f".{spec.name}.lock"
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        fail(f"{shown} is being run by another searchkd process (lock {os.path.relpath(lock_path)})")
    from .search import SPACE_FILE, SearchError, base_storage, connect, run_search

    try:
        try:
            connect(spec, args.address, args.num_cpus, storage=base_storage(spec, root))
        except SearchError as exc:
            fail(f"{source}: {exc}")
        teacher = _teacher(spec, root)
        search_dir.mkdir(exist_ok=True)
        if not resume:
            tmp = search_dir / f".{SPACE_FILE}.tmp"
            tmp.write_text(spec.to_yaml())
            os.replace(tmp, search_dir / SPACE_FILE)
        with RayLines.installed():
            summary, status = run_search(
                spec, search_dir, root, _lookups()["objectives"], teacher, resume=resume,
                tracking_uri=args.tracking_uri, address=args.address, num_cpus=args.num_cpus,
            )
            final_status = None
            if status == "finished" and spec.final is not None and summary is not None:
                from .final import prepare, run_final

                print()
                stage = prepare(search_dir, spec.final.top, spec.final.seeds)
                final_status = run_final(stage, teacher, args.address, args.num_cpus)[1]
    except SearchError as exc:
        fail(str(exc))
    finally:
        lock.release()
    if summary is not None:
        _print_summary(summary, spec, root, source)
        _report(search_dir, after_search=True)
    if status != "finished":
        print(f"searchkd: search {spec.name} is not finished; continue with: searchkd tune {source} --resume")
        return EXIT_INTERRUPTED if status == "interrupted" else 1
    if final_status not in (None, "finished"):
        print(f"searchkd: the final stage of {spec.name} is not finished; continue with: "
              f"searchkd final {os.path.relpath(search_dir)}")
        return EXIT_INTERRUPTED if final_status == "interrupted" else 1
    return 0


class RayLines(io.TextIOBase):
    """The search's stdout, where each message Ray's driver prints on its own becomes one line.

    Ray prints cluster events ("(raylet) The node ... has been marked dead because ...")
    straight to stdout, several lines each; searchkd keeps the first sentence, as one
    `searchkd: ray: ...` line, and drops the rest. Everything else passes unchanged.
    """

    ANSI = re.compile(r"\x1b\[[0-9;]*m")
    DEAD = re.compile(r"node id: (\w+) and address: (\S+) .*marked dead")

    def __init__(self, out: Any) -> None:
        self.out = out
        self.pending = ""
        self.inside = False  # after a Ray message: its indented continuation lines are dropped

    @classmethod
    @contextlib.contextmanager
    def installed(cls) -> Any:
        previous = sys.stdout
        sys.stdout = cls(previous)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stdout = previous

    def write(self, text: str) -> int:
        self.pending += text
        while "\n" in self.pending:
            line, self.pending = self.pending.split("\n", 1)
            self._line(line)
        return len(text)

    def _line(self, line: str) -> None:
        plain = self.ANSI.sub("", line)
        if plain.startswith("(raylet)"):
            self.inside = True
            dead = self.DEAD.search(plain)
            if dead:
                said = f"lost node {dead[2]} (node {dead[1][:8]}): it stopped answering"
            else:
                said = plain.removeprefix("(raylet)").strip().split(". ")[0].split("\t")[0]
            self.out.write(f"searchkd: ray: {said}\n")
        elif not (self.inside and plain[:1] in ("\t", " ")):
            self.inside = False
            self.out.write(line + "\n")
        self.out.flush()  # a line at a time: progress is read as it comes

    def flush(self) -> None:
        if self.pending:
            self._line(self.pending)
            self.pending = ""
        self.out.flush()


def local_ray_env() -> None:
    """A private local Ray listens on 127.0.0.1 only and reports no usage statistics.

    Ray binds its services to the machine's network address unless it believes it runs on a
    single-node platform; the switch is read when `ray` is first imported, so this runs
    before anything imports it.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _status(search_dir: Path) -> str | None:
    path = search_dir / "state.json"
    return json.loads(path.read_text())["status"] if path.exists() else None


def _teacher(spec: Spec, root: Path) -> Any:
    """Train-once-and-cache (or measure) the teacher; data and checkpoint errors are one line."""
    from .data import DatasetNotFound
    from .engine import CheckpointMismatch
    from .teacher import ensure_teacher

    try:
        return ensure_teacher(spec, root / "teachers")
    except DatasetNotFound as exc:
        fail(f"data.dataset: {exc}")
    except CheckpointMismatch as exc:
        fail(f"teacher.checkpoint: {exc}")


def cmd_teacher(args: argparse.Namespace) -> int:
    spec = load_space(args.space)
    root = trials_root(args.trials_dir)
    info = _teacher(spec, root)
    how = "trained from the recipe" if info.trained else "from its checkpoint"
    print(f"teacher {info.arch} ({how}): test_acc {info.test_acc:.4f}, val_acc {info.val_acc:.4f}")
    print(f"  weights: {info.path}")
    print(f"  cache:   {root / 'teachers' / info.digest}")
    return 0


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text())


def _print_summary(s: Any, spec: Spec, root: Path, source: str) -> None:
    rel = os.path.relpath(s.search_dir)
    print()
    print(f"search {spec.name}: {s.trials} trials ({s.finished} finished, {s.stopped} stopped early by ASHA, "
          f"{s.failed} failed)")
    print(f"teacher {spec.teacher.arch}: test_acc {s.teacher.test_acc:.4f}")
    print(f"best trial {s.best_trial}: {spec.metrics[0]} {s.best_value:.4f} (its kept student), "
          f"test_acc {s.test_acc:.4f}")
    print("  config: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(s.best_config.items())))
    print(f"search directory: {rel}  (results.parquet: one row per trial per epoch)")
    ui = "searchkd ui" + ("" if root == trials_root(None) else f" --trials-dir {os.path.relpath(root)}")
    print(f"compare trials:   {ui}   (MLflow UI, experiment {spec.name!r})")
    print(f"resume:           searchkd tune {source} --resume   or   searchkd resume {rel}")
    _print_final(s.search_dir)


def _print_final(search_dir: Path) -> None:
    """The final stage's summary, when the search has one (final.parquet)."""
    from .report import final_lines, read_final

    summary = read_final(search_dir)
    if summary is not None:
        for line in final_lines(summary):
            print(line)
        print(f"final stage:      {os.path.relpath(search_dir / 'final.parquet')}  (one row per config and seed)")


def _search_dir(directory: str) -> Path:
    from .report import SPACE_FILE  # not .search: a report imports neither Ray nor torch

    search_dir = Path(directory).expanduser().resolve()
    if not (search_dir / SPACE_FILE).is_file():
        fail(f"{directory}: not a search directory (no {SPACE_FILE})")
    return search_dir


def _report(search_dir: Path, out: str | None = None, mlflow: bool = True, after_search: bool = False) -> bool:
    """Write the search's report and log it to its parent MLflow run. A report that cannot be
    written, or a tracking store that is away, is one warning line: the search stands. A search
    that just ended without its tracking store is not made to wait for it a second time."""
    from .report import summary_lines, write_report

    try:
        report = write_report(search_dir, out)
    except Exception as exc:  # noqa: BLE001 - the report is a view: it never fails its search
        print(f"searchkd: warning: the report of {os.path.relpath(search_dir)} was not written: "
              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}")
        return False
    for line in summary_lines(report, final=not after_search):  # the search's summary showed it
        print(line)
    pending = json.loads((search_dir / "state.json").read_text()).get("tracking_pending") \
        if (search_dir / "state.json").exists() else False
    if mlflow and report.analysis.mlflow and pending and after_search:
        print(f"  not logged to MLflow: the tracking store was away when the search ended; "
              f"the resume logs it (or `searchkd report {os.path.relpath(search_dir)}` once the store is back)")
    elif mlflow and report.analysis.mlflow:
        from .tracking import log_report, one_line

        try:
            run = log_report(search_dir, report.directory)
            print(f"  logged to MLflow: artifacts report/ of the search's run {run}")
        except Exception as exc:  # noqa: BLE001 - a tracking store that is away: one line
            print(f"searchkd: warning: the report was not logged to MLflow "
                  f"({report.analysis.mlflow['tracking_uri']}): {one_line(exc)}")
    return True


def cmd_report(args: argparse.Namespace) -> int:
    return 0 if _report(_search_dir(args.directory), args.out, mlflow=not args.no_mlflow) else 1


def _final_search(where: str, trials_dir: str | None) -> Path:
    """The search `searchkd final` is about: a directory, or a search name under --trials-dir."""
    path = Path(where).expanduser()
    if not (path / "space.yaml").is_file() and os.sep not in where and not path.exists():
        path = trials_root(trials_dir) / where
    if not (path / "space.yaml").is_file():
        fail(f"{where}: no such search (no space.yaml in {os.path.relpath(path)})")
    return path.resolve()


def cmd_final(args: argparse.Namespace) -> int:
    search_dir = _final_search(args.search, args.trials_dir)
    shown = os.path.relpath(search_dir)
    if args.address is None:
        local_ray_env()
    from filelock import FileLock, Timeout

    lock_path = search_dir.parent / f".{search_dir.name}.lock"
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        fail(f"{shown} is being run by another searchkd process (lock {os.path.relpath(lock_path)})")
    from .final import FinalError, prepare, run_final
    from .report import ReportError
    from .search import SearchError

    try:
        try:
            stage = prepare(search_dir, args.top, args.seeds)
        except (FinalError, ReportError) as exc:
            fail(str(exc))
        # The teacher is read from its cache only when something is left to train.
        teacher = _teacher(stage.spec, search_dir.parent) if stage.todo else None
        with RayLines.installed():
            summary, status = run_final(stage, teacher, args.address)
    except SearchError as exc:
        fail(str(exc))
    finally:
        lock.release()
    print()
    _print_final(search_dir)
    if status != "finished":
        print(f"searchkd: the final stage of {stage.spec.name} is not finished; continue with: "
              f"searchkd final {shown}")
        return EXIT_INTERRUPTED if status == "interrupted" else 1
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cmd_best(args: argparse.Namespace) -> int:
    from .data import DatasetNotFound
    from .export import ExportError, export_best
    from .report import ReportError, fmt
    from .storage import StorageError

    search_dir = _search_dir(args.directory)
    try:
        done = export_best(search_dir, args.out, args.trial)
    except (ExportError, ReportError, StorageError) as exc:
        fail(str(exc))
    except DatasetNotFound as exc:  # the input shape comes from the dataset
        fail(f"data.dataset: {exc}")
    except OSError as exc:  # storage that cannot be read (credentials, a lost mount)
        fail(f"{args.directory}: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}")
    t = done.trial
    scores = ", ".join(f"{m} {fmt(v, m)}" for m, v in t.scores.items())
    print(f"trial {t.number} ({t.status}, {t.epochs} epochs): {scores}, test_acc {fmt(t.test_acc)}")
    print(f"written to {os.path.relpath(done.directory)}: " + ", ".join(p.name for p in done.files))
    print("load it:  model = build_model(**json.load(open('model.json'))); "
          "model.load_state_dict(torch.load('student.pt', weights_only=True)['model'])")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .objectives import get_objective

    spec = load_space(args.space)
    print(f"{args.space}: ok — search {spec.name!r}, objective {'/'.join(spec.objectives)}, "
          f"{spec.search.num_samples} trials × {spec.train.epochs} epochs, {len(spec.params)} searched params")
    for name in spec.objectives:
        resolved = get_objective(name).resolve(spec.loss if len(spec.objectives) == 1 else
                                               {k: v for k, v in spec.loss.items() if k in get_objective(name).tunables})
        print(f"  {name}: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in resolved.items()))
    for key, p in spec.params.items():
        print(f"  search {key}: {json.dumps(p.model_dump(by_alias=True, exclude_none=True, exclude_defaults=True))}")
    return 0


def cmd_objectives(args: argparse.Namespace) -> int:
    from .objectives import get_objective, objective_names

    for name in objective_names():
        cls = get_objective(name)
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        print(f"{name}: {doc}")
        for key, t in cls.tunables.items():
            rng = json.dumps(dict(t.search)) if t.search else "-"
            print(f"  loss.{key:<16} {t.kind:<6} default {json.dumps(t.default):<12} search {rng:<40} {t.help}")
        print()
    return 0


LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def ui_command(uri: str, host: str, port: int, extra_hosts: list[str]) -> tuple[list[str], list[str]]:
    """The `mlflow ui` command line, and the host names it answers for when bound beyond
    loopback (MLflow refuses requests whose Host header it does not know: this machine's
    names, the bound address, private networks and `extra_hosts` are passed on)."""
    import socket

    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    if host in LOOPBACK:
        return cmd, []
    names = {host, socket.gethostname(), socket.getfqdn(), *LOOPBACK, *extra_hosts} - {"0.0.0.0", "::"}
    allowed = sorted(names | {f"{n}:*" for n in names} | {"10.*", "172.*", "192.168.*"})
    return [*cmd, "--allowed-hosts", ",".join(allowed)], sorted(names)


def cmd_ui(args: argparse.Namespace) -> int:
    """The MLflow UI on the searches' store, in its own process group: stopping searchkd (Ctrl-C
    or SIGTERM) stops MLflow's server and its workers with it."""
    import signal
    import socket

    from .tracking import default_store

    root = trials_root(args.trials_dir)
    uri = args.tracking_uri or default_store(root)
    if not args.tracking_uri and not (root / "mlflow.db").exists():
        fail(f"no MLflow store at {root / 'mlflow.db'}: run a search first (searchkd tune SPACE)")
    try:
        with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as probe:
            probe.bind((args.host, args.port))
    except OSError as exc:
        fail(f"cannot serve on {args.host}:{args.port} ({exc.strerror}); choose another with --port")
    cmd, names = ui_command(uri, args.host, args.port, args.allowed_hosts)
    if names:
        print(f"searchkd: warning: the MLflow UI listens on {args.host}: anyone who reaches this machine on "
              f"port {args.port} can read and change every search's runs (it answers for: "
              f"{', '.join(names)}; add names with --allowed-hosts)", file=sys.stderr)
    print(f"MLflow UI on http://{args.host}:{args.port} (store {uri}); Ctrl-C to stop", flush=True)
    server = subprocess.Popen(cmd, start_new_session=True)

    def stop(signum: int, frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = server.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if code in (0, -signal.SIGTERM) else code


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="searchkd", description="Search how best to distill a teacher into a student.")
    p.add_argument("--version", action="version", version=f"searchkd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def run_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite store trials/mlflow.db)")
        sp.add_argument("--address", help="join a Ray cluster: auto (the one `ray start` made on this "
                        "machine) or HOST:PORT; default: a private local Ray on 127.0.0.1")
        sp.add_argument("--num-cpus", type=int, help="CPUs for the local Ray (default: all)")
        sp.add_argument("--storage", help="where trials write checkpoints and best students: a path "
                        "every node sees or s3://bucket/prefix (overrides search.storage)")

    t = sub.add_parser("tune", help="run a search (or --resume one)")
    t.add_argument("space", help="space file, e.g. spaces/quickstart.yaml")
    t.add_argument("--resume", action="store_true", help="continue an interrupted search")
    t.add_argument("--trials-dir", help="where searches live (default: ./trials)")
    run_opts(t)
    t.set_defaults(func=cmd_tune)

    r = sub.add_parser("resume", help="resume a search from its directory")
    r.add_argument("directory", help="e.g. trials/quickstart")
    run_opts(r)
    r.set_defaults(func=cmd_resume, trials_dir=None)

    te = sub.add_parser("teacher", help="train (once) and cache the space's teacher; show its accuracy")
    te.add_argument("space")
    te.add_argument("--trials-dir", help="where searches and the teacher cache live (default: ./trials)")
    te.set_defaults(func=cmd_teacher)

    v = sub.add_parser("validate", help="check a space file and show what it resolves to")
    v.add_argument("space")
    v.set_defaults(func=cmd_validate)

    o = sub.add_parser("objectives", help="list objectives and their tunables")
    o.set_defaults(func=cmd_objectives)

    rp = sub.add_parser("report", help="write a search's report (plots, top trials) to trials/NAME/report/")
    rp.add_argument("directory", help="e.g. trials/quickstart (running, interrupted or finished)")
    rp.add_argument("--out", help="where to write it (default: DIRECTORY/report)")
    rp.add_argument("--no-mlflow", action="store_true", help="do not log it to the search's MLflow run")
    rp.set_defaults(func=cmd_report)

    b = sub.add_parser("best", help="export the best trial's student, its config and a model card")
    b.add_argument("directory", help="e.g. trials/quickstart")
    b.add_argument("--out", help="where to write it (default: DIRECTORY/best)")
    b.add_argument("--trial", type=int, help="export this trial instead (e.g. a point of a Pareto front)")
    b.set_defaults(func=cmd_best)

    f = sub.add_parser("final", help="retrain the top configs and the default on train + val with "
                       "several seeds: is the winner really better on test?")
    f.add_argument("search", help="the search's directory (trials/NAME) or its name")
    f.add_argument("--top", type=_positive, help="how many of the best configs (default: the space's "
                   "final.top, else 3)")
    f.add_argument("--seeds", type=_positive, help="seeds per config (default: the space's final.seeds, else 3)")
    f.add_argument("--trials-dir", help="where searches live, for a search given by name (default: ./trials)")
    f.add_argument("--address", help="join a Ray cluster: auto or HOST:PORT; default: a private local Ray")
    f.set_defaults(func=cmd_final)

    u = sub.add_parser("ui", help="open the MLflow UI on the searches' store")
    u.add_argument("--trials-dir")
    u.add_argument("--tracking-uri")
    u.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    u.add_argument("--port", type=int, default=5000)
    u.add_argument("--allowed-hosts", nargs="*", default=[],
                   help="host names the UI answers for besides this machine's (with a non-loopback --host)")
    u.set_defaults(func=cmd_ui)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SpecError as exc:
        fail(str(exc))
    except OSError as exc:
        from .storage import disk_full

        if not disk_full(exc):
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        fail(f"no space left on device{where}; free space, then run the same command (with --resume "
             f"if the search had started)")
    except KeyboardInterrupt:
        print("\nsearchkd: interrupted; continue with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
