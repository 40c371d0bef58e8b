"""results.jsonl is the record of the rows; results.parquet the table built from it."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from searchkd.record import RESULTS_FILE, RESULTS_LOG, ResultsError, ResultsTable, read_rows


def _report(table: ResultsTable, number: int, epoch: int, **extra: float) -> None:
    table.add(
        number,
        f"t{number}",
        {"trial_number": number, "loss.tau": 0.1},
        {
            "epoch": epoch,
            "val_acc": 0.5 + epoch / 100,
            "score": 0.5,
            "timestamp": 1000.0 + 10 * number + epoch,
            **extra,
        },
    )


def _table(path: Path) -> list[tuple[int, int]]:
    return sorted((r["trial_number"], r["epoch"]) for r in pq.read_table(path).to_pylist())


def test_a_parquet_cut_short_is_rebuilt_from_the_record(tmp_path: Path) -> None:
    said: list[str] = []
    table = ResultsTable(tmp_path / RESULTS_FILE)
    for n in (0, 1):
        for e in (1, 2, 3):
            _report(table, n, e)
    _report(table, 1, 3, val_acc=0.0)  # a re-report of a recorded epoch: the first row stands
    table.flush()
    assert _table(tmp_path / RESULTS_FILE) == [(n, e) for n in (0, 1) for e in (1, 2, 3)]
    data = (tmp_path / RESULTS_FILE).read_bytes()
    (tmp_path / RESULTS_FILE).write_bytes(data[: len(data) // 2])
    with (tmp_path / RESULTS_LOG).open("a") as f:
        f.write('{"trial_number": 2, "ep')  # a kill mid-append

    again = ResultsTable(tmp_path / RESULTS_FILE, said.append)
    assert sorted(again.rows) == [(n, e) for n in (0, 1) for e in (1, 2, 3)]
    assert again.rows[(1, 3)]["val_acc"] == pytest.approx(0.53)
    assert said == [
        f"searchkd: {RESULTS_FILE} could not be read (cut short?); it is rebuilt from {RESULTS_LOG}"
    ]
    again.flush()
    assert _table(tmp_path / RESULTS_FILE) == [(n, e) for n in (0, 1) for e in (1, 2, 3)]
    assert (tmp_path / RESULTS_LOG).read_text().endswith("}\n")  # the torn line is gone
    assert [(r["trial_number"], r["epoch"]) for r in again.in_order()][:3] == [
        (0, 1),
        (0, 2),
        (0, 3),
    ]


def test_a_record_cut_short_is_rebuilt_from_the_table_that_holds_more(tmp_path: Path) -> None:
    """results.jsonl cut in the middle (whole lines lost) while results.parquet holds every
    row: readers see every row, saying so in one line; the driver's table (a resume) writes the
    missing rows back into the record, after which both agree and nothing more is said."""
    table = ResultsTable(tmp_path / RESULTS_FILE)
    for n in (0, 1, 2):
        for e in (1, 2, 3, 4):
            _report(table, n, e, **({"test_acc": 0.9} if n == 0 else {}))
    table.flush()
    every = [(n, e) for n in (0, 1, 2) for e in (1, 2, 3, 4)]
    lines = (tmp_path / RESULTS_LOG).read_text().splitlines(keepends=True)
    (tmp_path / RESULTS_LOG).write_text("".join(lines[:5]))  # trial 0 whole, trial 1 epoch 1

    said: list[str] = []
    rows = read_rows(tmp_path, said.append)
    assert sorted((r["trial_number"], r["epoch"]) for r in rows) == every
    assert said == [
        f"searchkd: warning: {RESULTS_LOG} holds 5 rows and {RESULTS_FILE} 12: {RESULTS_LOG} was "
        f"cut short; the 7 rows it lacks are read from {RESULTS_FILE}"
    ]
    assert len((tmp_path / RESULTS_LOG).read_text().splitlines()) == 5  # a reader writes nothing
    assert all(None not in r.values() for r in rows)  # the table's padding is not a value
    assert {r["epoch"] for r in rows if r["trial_number"] == 2} == {1, 2, 3, 4}

    said.clear()
    resumed = ResultsTable(tmp_path / RESULTS_FILE, said.append)
    assert sorted(resumed.rows) == every and len(said) == 1
    assert [r["epoch"] for r in resumed.by_trial()[1]] == [1, 2, 3, 4]
    assert (
        len(read_rows(tmp_path, said.append)) == 12 and len(said) == 1
    )  # the record holds every row again: nothing more to say
    assert len((tmp_path / RESULTS_LOG).read_text().splitlines()) == 12


def test_a_damaged_parquet_without_its_record_is_one_line(tmp_path: Path) -> None:
    (tmp_path / RESULTS_FILE).write_bytes(b"PAR1 not really")
    with pytest.raises(ResultsError) as err:
        _ = ResultsTable(tmp_path / RESULTS_FILE).rows
    assert "\n" not in str(err.value) and "move it aside" in str(err.value)


def test_an_older_search_with_parquet_only_gets_its_record(tmp_path: Path) -> None:
    table = ResultsTable(tmp_path / RESULTS_FILE)
    _report(table, 0, 1)
    table.flush()
    (tmp_path / RESULTS_LOG).unlink()
    assert sorted(ResultsTable(tmp_path / RESULTS_FILE).rows) == [(0, 1)]
    assert (tmp_path / RESULTS_LOG).exists()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("seconds_per_row", [0.0, 3.0])
def test_rewrites_write_o_n_rows_in_all_and_the_table_ends_whole(
    tmp_path: Path, seconds_per_row: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 40-trial × 60-epoch search, its rows arriving at once or every 3 s: the rows written
    to Parquet over the search are at most rows × (2 + 1/FRESH_GROWTH) (a rewrite per row
    writes ~rows²/2), a slow search's table lags by at most FRESH_S or 2% of its rows, and the
    table ends with every row exactly once."""
    clock = Clock()
    table = ResultsTable(tmp_path / RESULTS_FILE, clock=clock)
    sizes: list[int] = []
    write = table.write

    def counted() -> None:
        sizes.append(len(table.rows))
        write()

    monkeypatch.setattr(table, "write", counted)
    n, epochs = 40, 60
    rows = n * epochs
    for e in range(1, epochs + 1):
        for t in range(n):
            clock.now += seconds_per_row
            _report(table, t, e)
    table.flush()
    assert sum(sizes) <= rows * (2 + 1 / table.FRESH_GROWTH)  # geometric sizes, and the last flush
    assert sum(sizes) < rows * rows / 2 / 20  # against one rewrite per row
    if not seconds_per_row:
        assert (
            sum(sizes) <= rows * (2 + 1 / table.GROWTH) and len(sizes) <= 50
        )  # ~log(rows)/log(1.25)
    else:
        for a, b in zip(sizes, sizes[1:], strict=False):
            lag = b - a - 1  # rows recorded before the rewrite that waited for it
            assert lag * seconds_per_row <= table.FRESH_S or lag <= table.FRESH_GROWTH * a + 1
    assert _table(tmp_path / RESULTS_FILE) == sorted(
        (t, e) for t in range(n) for e in range(1, epochs + 1)
    )


def test_a_reader_sees_whole_rows_and_writes_nothing(tmp_path: Path) -> None:
    """The report and searchkd.results read a running search: a line being appended is not a
    row yet, and the record is left exactly as the search is writing it."""
    table = ResultsTable(tmp_path / RESULTS_FILE)
    for e in (1, 2):
        _report(table, 0, e)
    with (tmp_path / RESULTS_LOG).open("a") as f:
        f.write('{"trial_number": 0, "epoch": 3, "val_acc": 0.9')  # the search is mid-write
    before = (tmp_path / RESULTS_LOG).read_bytes()
    assert [(r["trial_number"], r["epoch"]) for r in read_rows(tmp_path)] == [(0, 1), (0, 2)]
    assert (tmp_path / RESULTS_LOG).read_bytes() == before
