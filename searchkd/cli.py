"""`searchkd` on the command line: tune, resume, final, report, best, validate, objectives, ui.

A thin shell over the library API (`searchkd.api`): it parses arguments, prints, and turns
every mistake a user can cause into one line, `searchkd: error: ...`, exit 2, before anything
is written.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import os
import re
import shlex
import subprocess
import sys
from typing import Any, NoReturn

from . import __version__, api
from .spec import SpecError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # what a shell reports for a program ended by Ctrl-C
EXIT_TERMINATED = 143  # ... and by SIGTERM (128 + 15), handled as Ctrl-C


def interrupted_code() -> int:
    return EXIT_TERMINATED if api.terminated() else EXIT_INTERRUPTED


def fail(message: str) -> NoReturn:
    print(f"searchkd: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def run_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "address": args.address,
        "num_cpus": args.num_cpus,
        "tracking_uri": args.tracking_uri,
        "storage": args.storage,
    }


def interrupted_hint(args: argparse.Namespace) -> str:
    """The command that continues what Ctrl-C stopped before a search summed up (its teacher
    training, say): the same command with its options, `--resume` added to a tune."""
    if args.command == "tune":
        options = {**run_options(args), "space": args.space, "trials_dir": args.trials_dir}
        return api.continue_commands(None, options)[0]
    if args.command == "resume":
        return f"searchkd resume {shlex.quote(args.directory)}" + "".join(
            f" --{k.replace('_', '-')} {shlex.quote(str(v))}"
            for k, v in run_options(args).items()
            if v is not None
        )
    return "the same command"


def exit_code(run: api.SearchRun) -> int:
    """0 when the search (and its final stage) finished; else the command that continues it,
    and 130 after Ctrl-C."""
    if run.status != "finished":
        print(
            f"searchkd: search {run.spec.name} is not finished; continue with: "
            f"{api.continue_command(run)}"
        )
        return interrupted_code() if run.status == "interrupted" else 1
    if run.final_status not in (None, "finished"):
        print(
            f"searchkd: the final stage of {run.spec.name} is not finished; continue with: "
            f"searchkd final {api.shown_path(run.search_dir)}"
        )
        return interrupted_code() if run.final_status == "interrupted" else 1
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    with RayLines.installed():
        run = api.tune(
            args.space, trials_dir=args.trials_dir, resume=args.resume, **run_options(args)
        )
    return exit_code(run)


def cmd_resume(args: argparse.Namespace) -> int:
    with RayLines.installed():
        run = api.resume(args.directory, **run_options(args))
    return exit_code(run)


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


def cmd_teacher(args: argparse.Namespace) -> int:
    info = api.teacher(args.space, args.trials_dir)
    root = api.trials_root(args.trials_dir)
    how = "trained from the recipe" if info.trained else "from its checkpoint"
    print(f"teacher {info.arch} ({how}): test_acc {info.test_acc:.4f}, val_acc {info.val_acc:.4f}")
    print(f"  weights: {info.path}")
    print(f"  cache:   {root / 'teachers' / info.digest}")
    return 0


def cmd_final(args: argparse.Namespace) -> int:
    with RayLines.installed():
        run = api.final(
            args.search,
            top=args.top,
            seeds=args.seeds,
            trials_dir=args.trials_dir,
            address=args.address,
            trials=args.trial,
        )
    if run.status != "finished":
        print(
            f"searchkd: the final stage of {run.search_dir.name} is not finished; continue with: "
            f"searchkd final {api.shown_path(run.search_dir)}"
        )
        return interrupted_code() if run.status == "interrupted" else 1
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _number(text: str) -> int:
    """A trial number: 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a trial number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a trial number is 0 or more, got {value}")
    return value


def _port(text: str) -> int:
    """A TCP port: 0 (any free one) to 65535."""
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 0 to 65535, got {text!r}")
    return value


def cmd_report(args: argparse.Namespace) -> int:
    return 0 if api.write_report(args.directory, args.out, mlflow=not args.no_mlflow) else 1


def cmd_best(args: argparse.Namespace) -> int:
    from .data import DatasetNotFound
    from .export import ExportError, export_best
    from .metrics import kept_name
    from .report import ReportError, fmt
    from .storage import StorageError

    search_dir = api.search_dir_of(args.directory)
    try:
        done = export_best(search_dir, args.out, args.trial)
    except (ExportError, ReportError, StorageError) as exc:
        fail(str(exc))
    except DatasetNotFound as exc:  # the input shape comes from the dataset
        fail(f"data.dataset: {exc}")
    except OSError as exc:  # storage that cannot be read (credentials, a lost mount)
        fail(
            f"{args.directory}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
        )
    t = done.trial
    scores = ", ".join(f"{kept_name(m)} {fmt(v, m)}" for m, v in t.scores.items())
    print(f"trial {t.number} ({t.status}, {t.epochs} epochs): {scores}, test_acc {fmt(t.test_acc)}")
    print(f"written to {os.path.relpath(done.directory)}: " + ", ".join(p.name for p in done.files))
    print(
        "load it:  model = build_model(**json.load(open('model.json'))); "
        "model.load_state_dict(torch.load('student.pt', weights_only=True)['model'])"
    )
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .objectives import get_objective

    spec = api.validate_space(args.space)
    print(
        f"{args.space}: ok — search {spec.name!r}, objective {'/'.join(spec.objectives)}, "
        f"{spec.search.num_samples} trials × {spec.train.epochs} epochs, {len(spec.params)} "
        f"searched params"
    )
    for name in spec.objectives:
        objective = get_objective(name)
        resolved = objective.resolve(objective.own_loss(spec.loss))
        print(f"  {name}: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in resolved.items()))
    for key, p in spec.params.items():
        print(
            f"  search {key}: "
            f"{json.dumps(p.model_dump(by_alias=True, exclude_none=True, exclude_defaults=True))}"
        )
    return 0


def cmd_objectives(args: argparse.Namespace) -> int:
    from .objectives import get_objective, objective_names

    for name in objective_names():
        cls = get_objective(name)
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        print(f"{name}: {doc}")
        for key, t in cls.tunables.items():
            rng = json.dumps(dict(t.search)) if t.search else "-"
            print(
                f"  loss.{key:<16} {t.kind:<6} default {json.dumps(t.default):<12} search "
                f"{rng:<40} {t.help}"
            )
        print()
    return 0


LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def ui_command(
    uri: str, host: str, port: int, extra_hosts: list[str]
) -> tuple[list[str], list[str]]:
    """The `mlflow ui` command line, and the host names it answers for when bound beyond
    loopback (MLflow refuses requests whose Host header it does not know: this machine's
    names, the bound address, private networks and `extra_hosts` are passed on)."""
    import socket

    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(port),
    ]
    if host in LOOPBACK:
        return cmd, []
    names = {host, socket.gethostname(), socket.getfqdn(), *LOOPBACK, *extra_hosts} - {
        "0.0.0.0",
        "::",
    }
    allowed = sorted(names | {f"{n}:*" for n in names} | {"10.*", "172.*", "192.168.*"})
    return [*cmd, "--allowed-hosts", ",".join(allowed)], sorted(names)


def cmd_ui(args: argparse.Namespace) -> int:
    """The MLflow UI on the searches' store, in its own process group: stopping searchkd (Ctrl-C
    or SIGTERM) stops MLflow's server and its workers with it."""
    import signal
    import socket

    from .tracking import default_store

    root = api.trials_root(args.trials_dir)
    uri = args.tracking_uri or default_store(root)
    if not args.tracking_uri and not (root / "mlflow.db").exists():
        fail(f"no MLflow store at {root / 'mlflow.db'}: run a search first (searchkd tune SPACE)")
    try:
        with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as probe:
            probe.bind((args.host, args.port))
            port = probe.getsockname()[1]  # --port 0: the free port the system chose
    except OSError as exc:
        fail(
            f"cannot serve on {args.host}:{args.port} ({exc.strerror}); choose another with --port"
        )
    args.port = port
    cmd, names = ui_command(uri, args.host, args.port, args.allowed_hosts)
    if names:
        print(
            f"searchkd: warning: the MLflow UI listens on {args.host}: anyone who reaches this "
            f"machine on port {args.port} can read and change every search's runs (it answers for: "
            f"{', '.join(names)}; add names with --allowed-hosts)",
            file=sys.stderr,
        )
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


class Parser(argparse.ArgumentParser):
    """argparse whose mistakes are one line like every other (`--help` still shows the usage)."""

    def error(self, message: str) -> NoReturn:
        where = self.prog.removeprefix("searchkd").strip()
        fail(f"{where}: {message}" if where else message)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="searchkd", description="Search how best to distill a teacher into a student.")
    p.add_argument("--version", action="version", version=f"searchkd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def run_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--tracking-uri", help="MLflow tracking URI (default: sqlite store trials/mlflow.db)"
        )
        sp.add_argument(
            "--address",
            help="join a Ray cluster: auto (the one `ray start` made on this "
            "machine) or HOST:PORT; default: a private local Ray on 127.0.0.1",
        )
        sp.add_argument("--num-cpus", type=int, help="CPUs for the local Ray (default: all)")
        sp.add_argument(
            "--storage",
            help="where trials write checkpoints and best students: a path "
            "every node sees or s3://bucket/prefix (overrides search.storage)",
        )

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

    te = sub.add_parser(
        "teacher", help="train (once) and cache the space's teacher; show its accuracy"
    )
    te.add_argument("space")
    te.add_argument(
        "--trials-dir", help="where searches and the teacher cache live (default: ./trials)"
    )
    te.set_defaults(func=cmd_teacher)

    v = sub.add_parser("validate", help="check a space file and show what it resolves to")
    v.add_argument("space")
    v.set_defaults(func=cmd_validate)

    o = sub.add_parser("objectives", help="list objectives and their tunables")
    o.set_defaults(func=cmd_objectives)

    f = sub.add_parser(
        "final",
        help="retrain the top configs and the default on train + val with "
        "several seeds: is the winner really better on test?",
    )
    f.add_argument("search", help="the search's directory (trials/NAME) or its name")
    f.add_argument(
        "--top",
        type=_positive,
        help="how many of the best configs (default: the space's final.top, else 3)",
    )
    f.add_argument(
        "--seeds",
        type=_positive,
        help="seeds per config (default: the space's final.seeds, else 3)",
    )
    f.add_argument(
        "--trial",
        type=_number,
        action="append",
        metavar="N",
        help="retrain trial N's config instead of the top ones (repeat it: points of a "
        "Pareto front, which no single score ranks)",
    )
    f.add_argument(
        "--trials-dir", help="where searches live, for a search given by name (default: ./trials)"
    )
    f.add_argument(
        "--address", help="join a Ray cluster: auto or HOST:PORT; default: a private local Ray"
    )
    f.set_defaults(func=cmd_final)

    rp = sub.add_parser(
        "report", help="write a search's report (plots, top trials) to trials/NAME/report/"
    )
    rp.add_argument("directory", help="e.g. trials/quickstart (running, interrupted or finished)")
    rp.add_argument("--out", help="where to write it (default: DIRECTORY/report)")
    rp.add_argument(
        "--no-mlflow", action="store_true", help="do not log it to the search's MLflow run"
    )
    rp.set_defaults(func=cmd_report)

    b = sub.add_parser("best", help="export the best trial's student, its config and a model card")
    b.add_argument("directory", help="e.g. trials/quickstart")
    b.add_argument("--out", help="where to write it (default: DIRECTORY/best)")
    b.add_argument(
        "--trial", type=int, help="export this trial instead (e.g. a point of a Pareto front)"
    )
    b.set_defaults(func=cmd_best)

    u = sub.add_parser("ui", help="open the MLflow UI on the searches' store")
    u.add_argument("--trials-dir")
    u.add_argument("--tracking-uri")
    u.add_argument(
        "--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)"
    )
    u.add_argument("--port", type=_port, default=5000, help="default 5000; 0: any free port")
    u.add_argument(
        "--allowed-hosts",
        nargs="*",
        default=[],
        help="host names the UI answers for besides this machine's (with a non-loopback --host)",
    )
    u.set_defaults(func=cmd_ui)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SpecError as exc:
        fail(str(exc))
    except api.SearchkdError as exc:
        for line in exc.lines[:-1]:
            print(f"searchkd: error: {line}", file=sys.stderr)
        fail(exc.lines[-1])
    except OSError as exc:
        from .storage import disk_full

        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):  # a file the user may not write
            fail(f"{exc.filename or 'a file'}: {exc.strerror}; searchkd needs to write there")
        if not disk_full(exc):
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        fail(
            f"no space left on device{where}; free space, then run the same command (with --resume "
            f"if the search had started)"
        )
    except KeyboardInterrupt:
        print(f"\nsearchkd: interrupted; continue with: {interrupted_hint(args)}", file=sys.stderr)
        return interrupted_code()


if __name__ == "__main__":
    raise SystemExit(main())
