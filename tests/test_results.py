"""results.jsonl is the record of the rows; results.parquet the table built from it."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from searchkd.record import RESULTS_FILE, RESULTS_LOG, ResultsError, ResultsTable


def _report(table: ResultsTable, number: int, epoch: int, **extra: float) -> None:
    table.add(number, f"t{number}", {"trial_number": number, "loss.tau": 0.1},
              {"epoch": epoch, "val_acc": 0.5 + epoch / 100, "score": 0.5,
               "timestamp": 1000.0 + 10 * number + epoch, **extra})


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
    assert said == [f"searchkd: {RESULTS_FILE} could not be read (cut short?); it is rebuilt from {RESULTS_LOG}"]
    again.flush()
    assert _table(tmp_path / RESULTS_FILE) == [(n, e) for n in (0, 1) for e in (1, 2, 3)]
    assert (tmp_path / RESULTS_LOG).read_text().endswith("}\n")  # the torn line is gone
    assert [(r["trial_number"], r["epoch"]) for r in again.in_order()][:3] == [(0, 1), (0, 2), (0, 3)]


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


COST_PER_ROW = 1e-4  # simulated seconds a rewrite takes per row of the table


@pytest.mark.parametrize("seconds_per_row", [0.0, 3.0])
def test_rewrites_cost_o_n_rows_or_a_twentieth_of_the_time(tmp_path: Path, seconds_per_row: float,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A 40-trial × 60-epoch search, its rows arriving at once or every 3 s: rewrites on growth
    write ≤ 5 × the rows in all (a rewrite per row would be ~rows²/2), rewrites for freshness
    take ≤ 5% of the time, and the table ends with every row exactly once."""
    clock = Clock()
    table = ResultsTable(tmp_path / RESULTS_FILE, clock=clock)
    writes: list[tuple[int, bool]] = []  # table size at each rewrite; whether growth asked for it
    write = table.write

    def counted() -> None:
        size = len(table.rows)
        writes.append((size, size - table.written_rows >= max(1, table.GROWTH * table.written_rows)))
        write()
        table.write_seconds = COST_PER_ROW * size

    monkeypatch.setattr(table, "write", counted)
    n, epochs = 40, 60
    for e in range(1, epochs + 1):
        for t in range(n):
            clock.now += seconds_per_row
            _report(table, t, e)
    table.flush()
    rows = n * epochs
    grown = [size for size, growth in writes if growth]
    fresh = [size for size, growth in writes if not growth]
    assert sum(grown) <= 5 * rows
    assert COST_PER_ROW * sum(fresh) <= table.WRITE_SHARE * clock.now + COST_PER_ROW * rows
    if not seconds_per_row:
        assert len(writes) <= 40  # ~log(rows)/log(1.25) rewrites, not one per row
    else:  # cheap rewrites here: the table lags the record by at most FRESH_S worth of rows
        sizes = [size for size, _ in writes]
        assert max(b - a for a, b in zip(sizes, sizes[1:], strict=False)) <= table.FRESH_S / seconds_per_row + 1
    assert _table(tmp_path / RESULTS_FILE) == sorted((t, e) for t in range(n) for e in range(1, epochs + 1))
