"""The rows a search's trials report: an append-only record, and the table built from it.

Each new row is appended to `results.jsonl` as it arrives, one JSON line, the way Optuna
appends to its journal: a kill loses at most the line being written (cut off on the next
read), and the cost of a row does not grow with the search. `results.parquet` is the table
built from the record (what users read). Rewriting it whole on every row costs O(N²) over a
search of N rows (~23k rewrites of a table growing to 23k rows for 96 trials × 240 epochs).
Here it is rewritten when it has grown by a quarter since it was last written, or by 2% once
FRESH_S have passed, and always when the search ends: the sizes rewritten grow geometrically,
so at most N·(2 + 1/0.02) rows are written in all, linear in N, and a slow search's table
lags its record by at most FRESH_S or 2% of its rows. The record is the truth: the readers
that must see the latest rows (`searchkd.results`, the report, a resume) read it, and a
Parquet file cut short or deleted is rebuilt from it, never lost.

A trial that runs again re-reports the epoch it resumes from; the row first recorded stands,
so the rows keep the order in which the search saw them (the order ASHA's rungs are rebuilt
in).
"""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .metrics import TEXT_KEYS, is_logged, is_number
from .storage import replace_atomically

# The files of a search directory (trials/NAME/), named once.
SPACE_FILE = "space.yaml"  # the space the search was started with
JOURNAL_FILE = "optuna.journal"  # the study: which trials exist and how they ended
STATE_FILE = "state.json"  # running | interrupted | finished, with the trial counts
STORAGE_FILE = "storage.json"  # where the trials write their state and students
RESULTS_FILE = "results.parquet"
RESULTS_LOG = "results.jsonl"
OPTIONS_FILE = "options.json"  # the command-line options the search was last run with
Log = Callable[[str], None]  # where a run's lines go: print, or a notebook's own
# The options of `tune`/`resume` that a command continuing the search must repeat, in order.
RUN_OPTIONS = ("tracking_uri", "address", "num_cpus", "storage")


def trials_dir_setting() -> str:
    """Where searches live without --trials-dir: $SEARCHKD_TRIALS_DIR, else ./trials."""
    return os.environ.get("SEARCHKD_TRIALS_DIR", "trials")


def default_trials_dir() -> Path:
    return Path(trials_dir_setting()).expanduser().resolve()


def write_options(search_dir: Path, options: Mapping[str, Any]) -> None:
    """Record the options this run of the search was given (its space file, trials directory,
    tracking URI, cluster address, CPUs, storage): every hint printed later, by this run, a
    resume or the report, is the command that continues this search with them."""
    kept = {k: v for k, v in options.items() if v is not None}
    old = read_options(search_dir)
    if "space" not in kept and "space" in old:  # a `resume DIR` keeps the space file it had
        kept["space"] = old["space"]
    replace_atomically(
        Path(search_dir) / OPTIONS_FILE, lambda p: p.write_text(json.dumps(kept, indent=1))
    )


def read_options(search_dir: Path) -> dict[str, Any]:
    """options.json, or {} (a search older than it, or a damaged one: hints then name fewer
    options, nothing else depends on it)."""
    try:
        options = json.loads((Path(search_dir) / OPTIONS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return options if isinstance(options, dict) else {}


def shown(path: str | Path) -> str:
    """A path as a hint prints it: relative to here unless that climbs out, quoted for a shell."""
    rel = os.path.relpath(path)
    return shlex.quote(str(Path(path).resolve()) if rel.startswith("..") else rel)


def _flags(options: Mapping[str, Any], trials_dir: bool) -> str:
    out = []
    root = options.get("trials_dir")
    if trials_dir and root and Path(root).resolve() != default_trials_dir():
        out.append(f"--trials-dir {shown(root)}")
    for key in RUN_OPTIONS:
        if options.get(key) is not None:
            out.append(f"--{key.replace('_', '-')} {shlex.quote(str(options[key]))}")
    return "".join(f" {f}" for f in out)


def continue_commands(
    search_dir: Path | None, options: Mapping[str, Any] | None = None
) -> list[str]:
    """The commands that continue this search as it was run (`options`, default: recorded):
    `searchkd tune SPACE --resume ...` when its space file is known, and `searchkd resume DIR
    ...` (the search directory names the trials directory itself) when it exists."""
    if options is None:
        options = read_options(search_dir) if search_dir is not None else {}
    out = []
    if options.get("space"):
        out.append(f"searchkd tune {shown(options['space'])} --resume{_flags(options, True)}")
    if search_dir is not None and (Path(search_dir) / SPACE_FILE).is_file():
        out.append(f"searchkd resume {shown(search_dir)}{_flags(options, False)}")
    return out


def ui_command(search_dir: Path) -> str:
    """`searchkd ui` on this search's store: its trials directory's, or its tracking server."""
    options = read_options(search_dir)
    flags = {"trials_dir": options.get("trials_dir", str(Path(search_dir).parent))}
    if options.get("tracking_uri"):
        return f"searchkd ui --tracking-uri {shlex.quote(options['tracking_uri'])}"
    return "searchkd ui" + _flags(flags, True)


class DamagedFile(RuntimeError):
    """A file of the search directory that cannot be read as what it is: one line naming it."""


class ResultsError(DamagedFile):
    """A results table that cannot be read and has no record to rebuild it from: one line."""


def read_state(search_dir: Path, warn: Log | None = None) -> dict[str, Any]:
    """state.json (status, counts, whether MLflow still waits); {} before the search wrote it
    or when it is damaged (empty, garbage, not a mapping): it only says how the search last
    stood, the study and the record hold the truth, and the next run rewrites it. `warn` is
    told, in one line naming the file."""
    path = Path(search_dir) / STATE_FILE
    try:
        state = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError) as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        state = why
    if isinstance(state, dict):
        return state
    if warn is not None:
        what = state if isinstance(state, str) else f"not a mapping: {str(state)[:40]}"
        warn(f"searchkd: warning: {path} is damaged ({what}); ignored (the next run rewrites it)")
    return {}


def check_log(path: Path, what: str) -> None:
    """Raise DamagedFile naming `path` and the line when a whole line of an append-only JSON
    log (optuna.journal) is not a record: a partial last line is a kill's (cut off by the
    writer's repair), but a bad line in the middle means the file was damaged, and reading on
    would build a wrong study."""
    if not path.exists():
        return
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                return  # a partial last line: the writer cuts it (cut_tail)
            try:
                ok = isinstance(json.loads(line), dict)
            except ValueError:
                ok = False
            if not ok:
                raise DamagedFile(
                    f"{path}: line {number} is not a {what} record ({line[:40]!r}): the file was "
                    f"damaged; restore it from a copy (searchkd never writes such a line)"
                )


def cut_tail(path: Path) -> int:
    """Drop a partial last line from an append-only log of lines; returns the bytes cut."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    with path.open("r+b") as f:
        f.truncate(keep)
    return len(data) - keep


def readable(path: Path) -> bool:
    try:
        pq.read_metadata(path)
        return True
    except (OSError, ValueError):
        return False


def key_of(row: Mapping[str, Any]) -> tuple[int, int]:
    return int(row["trial_number"]), int(row["epoch"])


def rows_beyond(table: Path, rows: Mapping[tuple[int, int], Any]) -> list[dict[str, Any]]:
    """The table's rows that the record lacks: a record cut short (truncated, or put back from
    an older copy) while results.parquet still holds every row. The table is read only when it
    holds more rows than the record (it lags a running search's record, never leads it)."""
    try:
        if not table.exists() or pq.read_metadata(table).num_rows <= len(rows):
            return []
        return [
            {k: v for k, v in r.items() if v is not None}  # the table's padding of absent keys
            for r in pq.read_table(table).to_pylist()
            if key_of(r) not in rows
        ]
    except (OSError, ValueError):
        return []  # a damaged table: the record is what there is


def beyond_line(extra: int, rows: int) -> str:
    """The one warning line a record rebuilt from the table gets."""
    return (
        f"searchkd: warning: {RESULTS_LOG} holds {rows} rows and {RESULTS_FILE} {rows + extra}: "
        f"{RESULTS_LOG} was cut short; the {extra} rows it lacks are read from {RESULTS_FILE}"
    )


def read_rows(search_dir: Path, say: Log | None = None) -> list[dict[str, Any]]:
    """The search's rows without touching its files (a running search may be appending): the
    record's whole lines, the first row of each (trial, epoch) standing, plus the table's rows
    a record cut short lacks (said in one line to `say`), else the table of a search older than
    the record; [] before the first epoch."""
    record, table = Path(search_dir) / RESULTS_LOG, Path(search_dir) / RESULTS_FILE
    if record.exists():
        rows: dict[tuple[int, int], dict[str, Any]] = {}
        with record.open() as f:
            for line in f:
                if not line.endswith("\n"):
                    break  # being written, or cut by a kill: not a whole record yet
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                rows.setdefault(key_of(r), r)
        extra = rows_beyond(table, rows)
        if extra and say:
            say(beyond_line(len(extra), len(rows)))
        return [*rows.values(), *extra]
    return pq.read_table(table).to_pylist() if table.exists() else []


class ResultsTable:
    """The rows trials report: one per trial per epoch, keyed by (trial number, epoch)."""

    GROWTH = 0.25  # rewrite the table once it has this share more rows than when last written
    FRESH_S = 30.0  # ... or, once this long has passed, FRESH_GROWTH more
    FRESH_GROWTH = 0.02

    def __init__(
        self, path: Path, log: Log | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.path = Path(path)
        self.log_path = self.path.with_name(RESULTS_LOG)
        self.say = log
        self.clock = clock
        self.loaded: dict[tuple[int, int], dict[str, Any]] | None = None
        self.dirty = False
        self.written_rows = 0  # rows in the table when it was last written
        self.written_at = clock()
        self.write_seconds = 0.0  # what the last rewrite took
        self.writes = 0

    @property
    def rows(self) -> dict[tuple[int, int], dict[str, Any]]:
        if self.loaded is None:
            self.loaded = self.load()
        return self.loaded

    def load(self) -> dict[tuple[int, int], dict[str, Any]]:
        rows: dict[tuple[int, int], dict[str, Any]] = {}
        if self.log_path.exists():
            cut_tail(self.log_path)
            with self.log_path.open() as f:
                for line in f:
                    try:
                        r = json.loads(line)
                    except ValueError:
                        continue  # not a whole record: nothing was acted on from it
                    rows.setdefault(key_of(r), r)
            extra = rows_beyond(self.path, rows)
            if extra:  # the record is rebuilt from the store that holds more
                if self.say:
                    self.say(beyond_line(len(extra), len(rows)))
                with self.log_path.open("a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in extra)
                rows.update((key_of(r), r) for r in extra)
            if self.path.exists() and not readable(self.path) and self.say:
                self.say(
                    f"searchkd: {self.path.name} could not be read (cut short?); it is rebuilt "
                    f"from {self.log_path.name}"
                )
                self.dirty = True
        elif self.path.exists():  # a search recorded before results.jsonl existed
            try:
                table = pq.read_table(self.path).to_pylist()
            except (OSError, ValueError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ResultsError(
                    f"{self.path} is damaged ({first}) and there is no {self.log_path.name} to "
                    f"rebuild it from; move it aside to go on (the study and MLflow keep every "
                    f"trial's result)"
                ) from None
            for r in table:
                rows[(int(r["trial_number"]), int(r["epoch"]))] = r
            with self.log_path.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows.values())
        return rows

    def add(
        self, number: int, trial_id: str, config: Mapping[str, Any], result: Mapping[str, Any]
    ) -> bool:
        """Record one reported epoch of trial `number`; whether it is new (a re-report of a
        recorded one, as a resumed trial replays its saved epochs, is dropped)."""
        key = (number, int(result["epoch"]))
        if key in self.rows:
            return False
        row = {
            k: v
            for k, v in result.items()
            if (is_number(v) and is_logged(k)) or (k in TEXT_KEYS and isinstance(v, str))
        }
        row["trial_id"] = trial_id
        row["trial_number"] = number
        row["objective"] = str(config.get("objective", ""))
        row["config"] = json.dumps(
            {k: v for k, v in config.items() if k != "trial_number"}, sort_keys=True
        )
        row["timestamp"] = float(result.get("timestamp", time.time()))
        with self.log_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows[key] = row
        self.dirty = True
        if self.due():
            self.write()
        return True

    def due(self) -> bool:
        new = len(self.rows) - self.written_rows
        if new >= max(1.0, self.GROWTH * self.written_rows):
            return True
        return (
            self.clock() - self.written_at >= self.FRESH_S
            and new >= self.FRESH_GROWTH * self.written_rows
        )

    def by_trial(self) -> dict[int, list[dict[str, Any]]]:
        out: dict[int, list[dict[str, Any]]] = {}
        for r in sorted(self.rows.values(), key=lambda r: r["epoch"]):
            out.setdefault(int(r["trial_number"]), []).append(r)
        return out

    def in_order(self) -> list[dict[str, Any]]:
        """Every row, in the order the search recorded them."""
        return sorted(
            self.rows.values(), key=lambda r: (r["timestamp"], r["trial_number"], r["epoch"])
        )

    def flush(self) -> None:
        """Write results.parquet if rows arrived since it was last written."""
        if self.dirty or (self.rows and not self.path.exists()):
            self.write()

    def write(self) -> None:
        start = time.perf_counter()
        rows = sorted(self.rows.values(), key=lambda r: (r["trial_number"], r["epoch"]))
        keys = sorted({k for r in rows for k in r})
        table = pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows])
        replace_atomically(self.path, lambda tmp: pq.write_table(table, tmp))
        self.write_seconds = time.perf_counter() - start
        self.written_rows, self.written_at, self.dirty = len(rows), self.clock(), False
        self.writes += 1


# -- the final stage (searchkd final): its summary, kept in final.parquet's metadata -------------
FINAL_FILE = "final.parquet"
FINAL_KEY = b"searchkd.final"


def read_final(search_dir: str | Path) -> dict[str, Any] | None:
    """The final stage's summary from `final.parquet`, or None when there is none (yet)."""
    path = Path(search_dir) / FINAL_FILE
    if not path.exists():
        return None
    try:
        raw = (pq.read_schema(path).metadata or {}).get(FINAL_KEY)
        return json.loads(raw) if raw else None
    except (OSError, ValueError):
        return None
