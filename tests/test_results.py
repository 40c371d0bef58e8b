"""results.jsonl is the record of the rows; results.parquet the table built from it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

from searchkd.search import RESULTS_FILE, RESULTS_LOG, ResultsTable, SearchError


def _report(table: ResultsTable, number: int, epoch: int, **extra: float) -> None:
    trial = SimpleNamespace(trial_id=f"t{number}", config={"trial_number": number, "loss.tau": 0.1})
    table.on_trial_result(trial, {"epoch": epoch, "val_acc": 0.5 + epoch / 100, "score": 0.5,
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
    with pytest.raises(SearchError) as err:
        _ = ResultsTable(tmp_path / RESULTS_FILE).rows
    assert "\n" not in str(err.value) and "move it aside" in str(err.value)


def test_an_older_search_with_parquet_only_gets_its_record(tmp_path: Path) -> None:
    table = ResultsTable(tmp_path / RESULTS_FILE)
    _report(table, 0, 1)
    table.flush()
    (tmp_path / RESULTS_LOG).unlink()
    assert sorted(ResultsTable(tmp_path / RESULTS_FILE).rows) == [(0, 1)]
    assert (tmp_path / RESULTS_LOG).exists()
