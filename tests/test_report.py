"""`searchkd report` and `searchkd best`: what the plots and tables show, checked against the
Parquet rows and the Optuna journal computed independently here; the report on a running
search, a big one, an offline page; the exported student; the MLflow side."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import optuna
import pytest
from conftest import free_port, run_cli, tiny_space, write_space
from searchgen import load_rows, make_search

from searchkd import report as rp
from searchkd.cli import main


# -- independent computations from the Parquet rows ---------------------------------------------
def by_trial(rows: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in rows:
        out.setdefault(r["trial_number"], []).append(r)
    return {n: sorted(v, key=lambda r: r["epoch"]) for n, v in out.items()}


def failed_in_journal(search: Path, name: str) -> set[int]:
    study = optuna.load_study(
        study_name=name,
        storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(search / "optuna.journal"))
        ),
    )
    return {t.number for t in study.trials if t.state == optuna.trial.TrialState.FAIL}


def kept_value(rows: list[dict], metric: str, mode: str) -> float:
    """The value of the student a trial keeps, written out again: val_acc -> the last row's
    best_val_acc (= the best val_acc it reached); other metrics: the best over its rows."""
    if metric == "val_acc":
        return max(r["val_acc"] for r in rows)
    values = [r[metric] for r in rows]
    return max(values) if mode == "max" else min(values)


def ranking(rows: list[dict], metric: str, mode: str, failed: set[int]) -> list[int]:
    scores = {n: kept_value(v, metric, mode) for n, v in by_trial(rows).items() if n not in failed}
    return sorted(scores, key=lambda n: ((-scores[n]) if mode == "max" else scores[n], n))


def non_dominated(
    rows: list[dict], metrics: list[str], modes: list[str], failed: set[int]
) -> set[int]:
    vec = {
        n: [kept_value(v, m, md) for m, md in zip(metrics, modes, strict=True)]
        for n, v in by_trial(rows).items()
        if n not in failed
    }
    sign = [1 if md == "max" else -1 for md in modes]
    out = set()
    for n, p in vec.items():
        beaten = False
        for m, q in vec.items():
            if m == n:
                continue
            ge = all(s * a >= s * b for a, b, s in zip(q, p, sign, strict=True))
            gt = any(s * a > s * b for a, b, s in zip(q, p, sign, strict=True))
            beaten = beaten or (ge and gt)
        if not beaten:
            out.add(n)
    return out


class Tables(HTMLParser):
    """The tables of a page, by id: lists of rows of cell texts."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self.links: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._row: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id", "")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "img":
            self.images.append(a.get("src", ""))
        elif tag in ("a", "link", "script"):
            self.links.append(a.get("href") or a.get("src") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def body(table: list[list[str]]) -> list[dict[str, str]]:
    head, *rest = table
    return [dict(zip(head, row, strict=True)) for row in rest]


def figure_of(plot, a):
    import matplotlib

    matplotlib.use("Agg")
    with rp.plotting():
        return plot(a)


def by_gid(fig, gid: str):
    found = [artist for ax in fig.axes for artist in ax.get_children() if artist.get_gid() == gid]
    assert found, f"no artist {gid!r}"
    return found[0]


# -- the definition of best ---------------------------------------------------------------------
def test_a_trials_score_is_its_kept_students_value() -> None:
    rows = [
        {"epoch": 1, "val_acc": 0.5, "best_val_acc": 0.5, "train_loss": 2.0},
        {"epoch": 3, "val_acc": 0.7, "best_val_acc": 0.9, "train_loss": 0.5},
        {"epoch": 2, "val_acc": 0.9, "best_val_acc": 0.9, "train_loss": 1.0},
    ]
    assert (
        rp.trial_score(rows, "val_acc", "max") == 0.9
    )  # the last epoch's best_val_acc, not its val_acc
    assert rp.trial_score(rows, "train_loss", "min") == 0.5
    assert rp.trial_score(rows, "train_loss", "max") == 2.0
    assert math.isnan(rp.trial_score([], "val_acc", "max"))
    assert math.isnan(
        rp.trial_score(
            [{"epoch": 1, "val_acc": math.nan, "best_val_acc": math.nan}], "val_acc", "max"
        )
    )


def test_the_best_trial_never_failed_and_ties_go_to_the_lowest_number() -> None:
    scores = {3: 0.9, 1: 0.9, 2: 0.95, 4: math.nan}
    assert rp.pick_best(scores, "max") == 2
    assert rp.pick_best(scores, "max", failed={2}) == 1
    assert rp.pick_best(scores, "min") == 1
    assert rp.pick_best({0: math.nan}, "max") is None


def test_pareto_set_is_the_non_dominated_set() -> None:
    import random

    rng = random.Random(3)
    for _ in range(30):
        pts = {
            n: [rng.choice([0.5, 0.6, 0.7, 0.8]), rng.choice([1.0, 2.0, 3.0])] for n in range(25)
        }
        rows = [
            {
                "trial_number": n,
                "epoch": 1,
                "val_acc": p[0],
                "best_val_acc": p[0],
                "student_macs": p[1],
            }
            for n, p in pts.items()
        ]
        assert set(rp.pareto_set(pts, ["max", "min"])) == non_dominated(
            rows, ["val_acc", "student_macs"], ["max", "min"], set()
        )


# -- a generated search ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def asha_search(tmp_path_factory) -> Path:
    search = make_search(
        tmp_path_factory.mktemp("trials"), "gen", trials=24, epochs=12, failed=(5,), seed=1
    )
    rp.write_report(search)
    return search


def test_history_ends_at_the_best_trials_score(asha_search: Path) -> None:
    rows = load_rows(asha_search)
    failed = failed_in_journal(asha_search, "gen")
    best = ranking(rows, "val_acc", "max", failed)[0]
    best_score = kept_value(by_trial(rows)[best], "val_acc", "max")
    data = json.loads((asha_search / "report" / "data.json").read_text())
    assert data["best"]["trial"] == best and data["best"]["scores"]["val_acc"] == pytest.approx(
        best_score
    )
    assert data["history"]["best"][-1] == pytest.approx(best_score)
    assert data["history"]["trial_epochs"] == list(
        range(1, len(rows) + 1)
    )  # one per row: the cost axis
    ys = data["history"]["best"]
    assert all(
        b >= a for a, b in zip(ys, ys[1:], strict=False) if a is not None
    )  # best so far never drops
    # What the plot draws is that series.
    a = rp.analyze(asha_search)
    fig = figure_of(rp.plot_history, a)
    line = by_gid(fig, "best-so-far")
    assert list(line.get_xdata()) == data["history"]["trial_epochs"]
    assert line.get_ydata()[-1] == pytest.approx(best_score)
    ring = by_gid(fig, "best-trial").get_offsets()[0]
    assert ring[1] == pytest.approx(best_score) and ring[0] == data["best"]["end_x"]
    # Each trial is a point where it ended, marked by how it ended.
    stopped = {n for n, v in by_trial(rows).items() if v[-1]["epoch"] < 12 and n not in failed}
    assert len(by_gid(fig, "trials-stopped").get_offsets()) == len(stopped)
    assert len(by_gid(fig, "trials-failed").get_offsets()) == len(failed) == 1
    assert len(by_gid(fig, "trials-finished").get_offsets()) == 24 - len(stopped) - 1


def test_learning_curves_show_every_trial_and_the_rungs(asha_search: Path) -> None:
    rows = by_trial(load_rows(asha_search))
    a = rp.analyze(asha_search)
    fig = figure_of(rp.plot_curves, a)
    for n, mine in rows.items():
        line = by_gid(fig, f"trial-{n}")
        assert list(line.get_xdata()) == [r["epoch"] for r in mine]
        assert list(line.get_ydata()) == pytest.approx([r["val_acc"] for r in mine])
    # grace 1 (12 // 9), reduction 3, 12 epochs: Ray's rungs at 1, 3, 9
    assert a.rungs == [1, 3, 9]
    for r in a.rungs:
        assert by_gid(fig, f"rung-{r}").get_xdata()[0] == r
    statuses = {t.number: t.status for t in a.trials}
    assert {n for n, s in statuses.items() if s == "stopped"} == {
        n for n, v in rows.items() if v[-1]["epoch"] < 12 and n != 5
    }
    assert statuses[5] == "failed"


def test_the_top_10_table_matches_the_parquet(asha_search: Path) -> None:
    rows = load_rows(asha_search)
    trials = by_trial(rows)
    order = ranking(rows, "val_acc", "max", {5})[:10]
    runs = json.loads((asha_search / "mlflow_runs.json").read_text())
    page = Tables((asha_search / "report" / "index.html").read_text())
    top = body(page.tables["top"])
    assert [int(r["trial"]) for r in top] == order
    for r in top:
        n = int(r["trial"])
        last = trials[n][-1]
        config = json.loads(last["config"])
        assert r["val_acc"] == f"{max(x['val_acc'] for x in trials[n]):.4f}"
        assert r["test_acc"] == f"{last['test_acc']:.4f}"
        assert r["epochs"] == str(last["epoch"])
        assert r["MLflow run"] == runs[str(n)]
        assert r["params"] == rp.fmt(last["student_params"], "student_params")
        assert r["MACs"] == rp.fmt(last["student_macs"], "student_macs")
        assert r["config"] == ", ".join(
            f"{k}={rp.short(v)}"
            for k, v in sorted(config.items())
            if k not in ("seed", "objective")
        )
    data = json.loads((asha_search / "report" / "data.json").read_text())
    assert [t["trial"] for t in data["top"]] == order
    # Every trial is listed once in the full table.
    assert sorted(int(r["trial"]) for r in body(page.tables["trials"])) == sorted(trials)


def test_importances_are_optunas_on_the_trials_scores(asha_search: Path) -> None:
    rows = load_rows(asha_search)
    trials = by_trial(rows)
    study = optuna.load_study(
        study_name="gen",
        storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(asha_search / "optuna.journal"))
        ),
    )
    copy = optuna.create_study(direction="maximize")
    for t in study.trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            copy.add_trial(
                optuna.trial.create_trial(
                    params=t.params,
                    distributions=t.distributions,
                    value=kept_value(trials[t.number], "val_acc", "max"),
                )
            )
    expected = optuna.importance.get_param_importances(copy)
    data = json.loads((asha_search / "report" / "data.json").read_text())
    assert list(data["importances"]) == list(expected)
    assert list(data["importances"].values()) == pytest.approx(list(expected.values()))
    assert (asha_search / "report" / "importances.png").exists() and (
        asha_search / "report" / "slices.png"
    ).exists()


def test_the_page_opens_offline(asha_search: Path) -> None:
    from PIL import Image

    text = (asha_search / "report" / "index.html").read_text()
    page = Tables(text)
    assert len(page.images) == 4  # history, curves, importances, slices
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert img.width >= 900 and img.height >= 300  # written at the size it is read
    assert not re.search(r"<script|<link|@import|src=\"http", text)  # nothing to fetch
    assert all(
        not link.startswith("http") or link.startswith("http://127.0.0.1") for link in page.links
    )
    for name in ("history", "curves", "importances", "slices"):
        assert Image.open(asha_search / "report" / f"{name}.png").format == "PNG"


def test_multi_objective_report_has_the_pareto_front(tmp_path: Path) -> None:
    search = make_search(
        tmp_path,
        "mo",
        trials=30,
        epochs=6,
        metric=["val_acc", "student_macs"],
        mode=["max", "min"],
        scheduler="none",
        failed=(4,),
        seed=2,
    )
    rp.write_report(search)
    rows = load_rows(search)
    expected = non_dominated(rows, ["val_acc", "student_macs"], ["max", "min"], {4})
    data = json.loads((search / "report" / "data.json").read_text())
    assert set(data["pareto"]) == expected
    page = Tables((search / "report" / "index.html").read_text())
    assert {int(r["trial"]) for r in body(page.tables["pareto"])} == expected
    a = rp.analyze(search)
    fig = figure_of(rp.plot_pareto, a)
    drawn = {(round(x, 6), round(y, 6)) for x, y in by_gid(fig, "pareto").get_offsets()}
    trials = by_trial(rows)
    assert drawn == {
        (
            round(trials[n][-1]["student_macs"] / 1e3, 6),
            round(max(r["val_acc"] for r in trials[n]), 6),
        )
        for n in expected
    }
    assert len(by_gid(fig, "dominated").get_offsets()) == 29 - len(expected)


def test_a_choice_of_objectives_is_compared_side_by_side(tmp_path: Path) -> None:
    search = make_search(tmp_path, "choice", trials=16, epochs=9, objectives=["kd", "msd"], seed=4)
    report = rp.write_report(search)
    assert search / "report" / "objectives.png" in report.figures
    trials = by_trial(load_rows(search))
    fig = figure_of(rp.plot_objectives, report.analysis)
    for objective in ("kd", "msd"):
        for status, full in (("finished", True), ("stopped", False)):
            mine = sorted(
                max(r["val_acc"] for r in v)
                for v in trials.values()
                if v[-1]["objective"] == objective and (v[-1]["epoch"] == 9) == full
            )
            if mine:
                drawn = sorted(
                    y for _, y in by_gid(fig, f"objective-{objective}-{status}").get_offsets()
                )
                assert drawn == pytest.approx(mine)


def test_report_of_a_running_search_takes_no_lock_and_changes_nothing(
    tmp_path: Path, capsys
) -> None:
    from filelock import FileLock

    search = make_search(
        tmp_path, "live", trials=10, epochs=12, running=(7, 8, 9), state="running", seed=5
    )
    before = {p: p.stat().st_mtime_ns for p in search.rglob("*")}
    lock = FileLock(str(tmp_path / ".live.lock"))  # what `searchkd tune` holds while it runs
    lock.acquire(timeout=0)
    try:
        start = time.perf_counter()
        assert main(["report", str(search)]) == 0
        assert (
            time.perf_counter() - start < 120
        )  # it did not wait for the lock (generous: loaded CI)
    finally:
        lock.release()
    out = capsys.readouterr().out
    assert "report: " in out and "index.html" in out
    assert {p: p.stat().st_mtime_ns for p in before if p.exists()} == before  # read, never written
    assert all(p.is_relative_to(search / "report") for p in set(search.rglob("*")) - set(before))
    data = json.loads((search / "report" / "data.json").read_text())
    assert data["state"] == "running" and data["counts"]["running"] == 3
    assert {t["trial"] for t in data["trials"] if t["status"] == "running"} == {7, 8, 9}


def test_report_of_200_trials_of_50_epochs_takes_seconds(tmp_path: Path, record_property) -> None:
    """Measured, not asserted against a budget: the number is printed (pytest -s) and recorded."""
    search = make_search(
        tmp_path, "big", trials=200, epochs=50, failed=(7, 70), stop_fraction=0.6, seed=6
    )
    start = time.perf_counter()
    report = rp.write_report(search)
    seconds = time.perf_counter() - start
    record_property("report_seconds", seconds)
    print(
        f"\nreport of 200 trials x 50 epochs ({report.analysis.trial_epochs} rows): {seconds:.2f}s"
    )
    rows = load_rows(search)
    data = json.loads((search / "report" / "data.json").read_text())
    assert len(data["trials"]) == 200 and len(data["history"]["best"]) == len(rows)
    assert [t["trial"] for t in data["top"]] == ranking(rows, "val_acc", "max", {7, 70})[:10]


# -- the Optuna study, as optuna-dashboard opens it ------------------------------------------------
@pytest.mark.parametrize("state", ["finished", "running"])
def test_optuna_dashboard_opens_the_journal(tmp_path: Path, state: str) -> None:
    running = (3, 4) if state == "running" else ()
    search = make_search(tmp_path, "dash", trials=6, epochs=4, running=running, state=state, seed=7)
    path = str(search / "optuna.journal")
    # What `optuna-dashboard trials/NAME/optuna.journal` does with a path: a JournalFileBackend.
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
    [summary] = optuna.get_all_study_summaries(storage)
    assert summary.study_name == "dash" and summary.n_trials == 6
    states = [t.state.name for t in optuna.load_study(study_name="dash", storage=storage).trials]
    assert states.count("RUNNING") == len(running)
    dashboard = pytest.importorskip(
        "optuna_dashboard", reason="optional extra: pip install 'searchkd[dashboard]'"
    )
    from optuna_dashboard._storage_url import get_storage

    app = dashboard.wsgi(get_storage(path))
    studies = _wsgi_get(app, "/api/studies")
    assert [s["study_name"] for s in studies["study_summaries"]] == ["dash"]
    detail = _wsgi_get(app, f"/api/studies/{studies['study_summaries'][0]['study_id']}")
    assert len(detail["trials"]) == 6
    assert sum(t["state"] == "Running" for t in detail["trials"]) == len(running)


def _wsgi_get(app, path: str) -> dict:
    from wsgiref.util import setup_testing_defaults

    environ: dict = {"PATH_INFO": path, "REQUEST_METHOD": "GET"}
    setup_testing_defaults(environ)
    status: list[str] = []
    chunks = app(environ, lambda s, headers, exc_info=None: status.append(s))
    text = b"".join(chunks).decode()
    assert status[0].startswith("200"), (status, text[:500])
    return json.loads(text)


# -- MLflow ----------------------------------------------------------------------------------------
def test_the_experiment_opens_on_a_table_of_the_trials() -> None:
    from searchkd.mlflow_ui import ui_link, ui_tags

    raw = {
        "objective": {"choice": ["kd", "msd"]},
        "search": {"metric": ["val_acc", "student_macs"], "mode": ["max", "min"]},
        "params": {"student.width": {"choice": [0.5, 1.0]}, "loss.tau": {"float": [0.05, 0.5]}},
    }
    tags = ui_tags(raw)
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(tags["mlflow.sharedViewState.searchkd"])
    assert view["orderByKey"] == "metrics.`score`" and view["orderByAsc"] is False
    # The runs table's first columns, whatever the window's width: the score, the search's
    # metrics as of the epoch, test_acc (MLflow puts its own columns first without an order).
    assert view["columnOrder"] == [
        "metrics.`score`",
        "metrics.`val_acc`",
        "metrics.`student_macs`",
        "metrics.`test_acc`",
    ]
    assert view["selectedColumns"][:4] == view["columnOrder"]
    for column in (
        "metrics.`val_acc`",
        "metrics.`student_macs`",
        "params.`objective`",
        "params.`student.width`",
        "params.`loss.tau`",
    ):
        assert column in view["selectedColumns"]
    assert ui_link("sqlite:////x/mlflow.db", "7") == (
        "http://127.0.0.1:5000/#/experiments/7/runs?viewStateShareKey=searchkd&workflowType=machine_learning"
    )
    assert ui_link("http://mlflow.lan:5000/", "7").startswith(
        "http://mlflow.lan:5000/#/experiments/7/runs?"
    )


def test_a_tracking_store_that_is_away_is_one_warning(tmp_path: Path, capsys) -> None:
    search = make_search(tmp_path, "away", trials=4, epochs=3, seed=8)
    (search / "tracking.json").write_text(
        json.dumps(
            {
                "tracking_uri": f"http://127.0.0.1:{free_port()}",
                "experiment_id": "3",
                "parent_run_id": "abc",
            }
        )
    )
    assert main(["report", str(search)]) == 0
    out, err = capsys.readouterr()
    warnings = [line for line in out.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "not logged to MLflow" in warnings[0], out
    assert "Traceback" not in out + err
    assert (
        "http://127.0.0.1:" in out and "#/experiments/3/runs" in out
    )  # the link is printed anyway
    assert (search / "report" / "index.html").exists()


def test_a_search_the_store_missed_at_its_end_is_not_made_to_wait_again(
    tmp_path: Path, capsys
) -> None:
    search = make_search(tmp_path, "pending", trials=3, epochs=2, seed=11)
    state = json.loads((search / "state.json").read_text())
    (search / "state.json").write_text(
        json.dumps({**state, "status": "interrupted", "tracking_pending": True})
    )
    (search / "tracking.json").write_text(
        json.dumps(
            {
                "tracking_uri": f"http://127.0.0.1:{free_port()}",
                "experiment_id": "3",
                "parent_run_id": "abc",
            }
        )
    )
    from searchkd.api import write_report

    assert write_report(
        search, after_search=True
    )  # what `searchkd tune` calls when the search ends
    out = capsys.readouterr().out
    assert "not logged to MLflow: the tracking store was away" in out and "warning" not in out


def test_a_search_without_results_yet_has_a_report(tmp_path: Path) -> None:
    import yaml
    from searchgen import space

    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "space.yaml").write_text(yaml.safe_dump(space("new", 4, 3)))
    report = rp.write_report(tmp_path / "new")
    assert report.figures == [] and report.analysis.best is None
    assert "No trial has reported an epoch yet" in report.index.read_text()


def test_not_a_search_directory_is_one_line(tmp_path: Path, capsys) -> None:
    for command in ("report", "best"):
        with pytest.raises(SystemExit) as exc:
            main([command, str(tmp_path)])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "not a search directory" in err


def test_the_teacher_digest_is_the_caches(tmp_path: Path) -> None:
    """The report finds the teacher's meta.json by the digest the cache itself was written under:
    the recipe (and search seed) for a trained teacher, the file's content for a checkpoint."""
    import shutil

    from searchkd.spec import Spec, teacher_digest
    from searchkd.teacher import ensure_teacher

    spec = Spec.model_validate(tiny_space())
    info = ensure_teacher(spec, tmp_path / "teachers", log=lambda _: None)
    assert (
        info.digest == teacher_digest(spec)
        and rp.teacher_meta(spec, tmp_path)["test_acc"] == info.test_acc
    )
    reseeded = Spec.model_validate(tiny_space(search={**tiny_space()["search"], "seed": 1}))
    assert teacher_digest(reseeded) != info.digest  # another seed trains another teacher

    def from_file(path: Path) -> Spec:
        raw = tiny_space(teacher={"arch": "resnet8", "width": 0.5, "checkpoint": str(path)})
        raw["teacher"].pop("train")
        return Spec.model_validate(raw)

    copy = tmp_path / "elsewhere" / "t.pt"
    copy.parent.mkdir()
    shutil.copy(info.path, copy)
    assert teacher_digest(from_file(copy)) == teacher_digest(
        from_file(info.path)
    )  # content, not path
    measured = ensure_teacher(from_file(copy), tmp_path / "teachers", log=lambda _: None)
    assert measured.digest == teacher_digest(from_file(copy)) and measured.test_acc == info.test_acc
    copy.write_bytes(copy.read_bytes() + b"\0")
    assert teacher_digest(from_file(copy)) != measured.digest


# -- the best student ------------------------------------------------------------------------------
def test_best_exports_a_student_that_loads_with_weights_only(tmp_path: Path, capsys) -> None:
    import torch

    from searchkd.models import build_model

    search = make_search(tmp_path, "exp", trials=6, epochs=4, seed=9)
    best = rp.analyze(search).best
    width = best.config["student.width"]
    # What the trial would have written: its best-on-val student in the search's storage.
    weights = build_model(
        "resnet8", num_classes=10, width=width, in_channels=1, image_size=8
    ).state_dict()
    folder = search / "checkpoints" / f"trial-{best.number:04d}"
    folder.mkdir(parents=True)
    torch.save(weights, folder / "student_best.pt")
    out = tmp_path / "best"
    assert main(["best", str(search), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"trial {best.number}" in printed and "student.pt" in printed
    spec_args = json.loads((out / "model.json").read_text())
    assert spec_args == {
        "arch": "resnet8",
        "width": width,
        "num_classes": 10,
        "in_channels": 1,
        "image_size": 8,
    }
    # The README's three lines.
    model = build_model(**json.loads((out / "model.json").read_text()))
    model.load_state_dict(torch.load(out / "student.pt", weights_only=True)["model"])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    card = (out / "model_card.md").read_text()
    for needle in (
        "resnet8",
        "teacher",
        "digits",
        "msd",
        "val_acc",
        "test accuracy",
        "MACs",
        "parameters",
    ):
        assert needle in card
    import yaml

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["student"]["width"] == width and config["params"] == {}
    assert config["loss"]["kd_weight"] == pytest.approx(best.config["loss.kd_weight"])
    # Another trial on request (a point of a Pareto front, say); a trial without weights is one
    # line.
    with pytest.raises(SystemExit):
        main(
            [
                "best",
                str(search),
                "--trial",
                str((best.number + 1) % 6),
                "--out",
                str(tmp_path / "other"),
            ]
        )
    assert "no student_best.pt" in capsys.readouterr().err


# -- a real browser, where there is one ------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium here (apt-get install chromium); the README has the command",
)
def test_the_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    from PIL import Image, ImageStat

    search = make_search(
        tmp_path,
        "shot",
        trials=20,
        epochs=6,
        metric=["val_acc", "student_macs"],
        mode=["max", "min"],
        scheduler="none",
        seed=10,
    )
    rp.write_report(search)
    shot = tmp_path / "shot.png"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--hide-scrollbars",
        "--window-size=1280,3000",
        f"--screenshot={shot}",
        (search / "report" / "index.html").as_uri(),
    ]
    subprocess.run(cmd, capture_output=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    img = Image.open(shot).convert("L")
    assert img.size == (1280, 3000)
    # The plots were drawn: the page is far from one flat colour in its figure area.
    assert ImageStat.Stat(img.crop((0, 700, 1280, 3000))).stddev[0] > 20


# -- real searches on digits -----------------------------------------------------------------------
@pytest.mark.integration
def test_a_search_ends_with_its_report_and_its_best_student_reproduces(
    ray_session, tmp_path: Path, capsys
) -> None:
    import torch
    import yaml
    from mlflow.tracking import MlflowClient

    from searchkd.engine import Engine
    from searchkd.models import build_model
    from searchkd.spec import Spec

    trials = tmp_path / "trials"
    raw = tiny_space("rep", train={**tiny_space()["train"], "epochs": 3})
    raw["search"].update(num_samples=3, scheduler="asha", grace_period=1, reduction_factor=2)
    space = write_space(tmp_path / "rep.yaml", raw)
    assert main(["tune", str(space), "--trials-dir", str(trials)]) == 0
    out = capsys.readouterr().out
    search = trials / "rep"
    assert f"report: {os.path.relpath(search / 'report' / 'index.html')}" in out
    assert "logged to MLflow" in out and "viewStateShareKey=searchkd" in out
    # The history's last best is the summary's best value.
    # (the summary's line, not a progress line's "| best trial N: ..." tail)
    summary_best = float(re.search(r"^best trial \d+: best_val_acc ([0-9.]+),", out, re.M)[1])
    data = json.loads((search / "report" / "data.json").read_text())
    assert f"{data['history']['best'][-1]:.4f}" == f"{summary_best:.4f}"

    # The report is on the search's parent run; the experiment opens on its trials.
    tracking = json.loads((search / "tracking.json").read_text())
    client = MlflowClient(tracking["tracking_uri"])
    logged = {a.path for a in client.list_artifacts(tracking["parent_run_id"], "report")}
    assert {
        "report/index.html",
        "report/history.png",
        "report/curves.png",
        "report/data.json",
    } <= logged
    tags = client.get_experiment(tracking["experiment_id"]).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(tags["mlflow.sharedViewState.searchkd"])
    runs = client.search_runs([tracking["experiment_id"]], filter_string=view["searchFilter"])
    assert len(runs) == 3  # the trials' runs, not the search's own
    for column in view["selectedColumns"]:
        kind, key = column.split(".", 1)
        if kind == "params":
            assert key.strip("`") in runs[0].data.params

    # searchkd best: loads with weights_only and gives the reported test accuracy again.
    assert main(["best", str(search)]) == 0
    best_dir = search / "best"
    model = build_model(**json.loads((best_dir / "model.json").read_text()))
    state = torch.load(best_dir / "student.pt", weights_only=True)["model"]
    model.load_state_dict(state)
    best = data["best"]
    spec = Spec.model_validate(yaml.safe_load((best_dir / "config.yaml").read_text()))
    teacher = next((trials / "teachers").glob("*/teacher.pt"))
    engine = Engine(spec, seed=0, teacher_checkpoint=teacher)
    engine.student.load_state_dict(state)
    assert engine.evaluate("test").top1 == pytest.approx(best["test_acc"], abs=1e-9)
    assert engine.evaluate("val").top1 == pytest.approx(best["scores"]["val_acc"], abs=1e-9)

    # The library API reads the same search: its rows, its best student, a finished resume.
    import searchkd

    frame = searchkd.results(search)
    assert len(frame) == len(load_rows(search)) and set(frame.trial_number) == {0, 1, 2}
    loaded = searchkd.load_student(search)
    assert not loaded.training
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    run = searchkd.resume(search, say=lambda _: None)
    assert run.status == "finished" and run.summary is None  # nothing run again


@pytest.mark.integration
def test_a_multi_objective_digits_search_has_its_pareto_front(
    ray_session, tmp_path: Path, capsys
) -> None:
    trials = tmp_path / "trials"
    raw = tiny_space(
        "mo",
        search={
            **tiny_space()["search"],
            "num_samples": 4,
            "metric": ["val_acc", "student_macs"],
            "mode": ["max", "min"],
            "sampler": "nsga2",
            "scheduler": "none",
        },
    )
    raw["params"]["student.width"] = {"choice": [0.25, 0.5, 1.0]}
    space = write_space(tmp_path / "mo.yaml", raw)
    assert main(["tune", str(space), "--trials-dir", str(trials)]) == 0
    out = capsys.readouterr().out
    search = trials / "mo"
    rows = load_rows(search)
    expected = non_dominated(rows, ["val_acc", "student_macs"], ["max", "min"], set())
    assert (
        f"Pareto front (val_acc vs student_macs): trials {', '.join(map(str, sorted(expected)))}"
        in out
    )
    data = json.loads((search / "report" / "data.json").read_text())
    assert set(data["pareto"]) == expected
    page = Tables((search / "report" / "index.html").read_text())
    assert {int(r["trial"]) for r in body(page.tables["pareto"])} == expected
    assert (search / "report" / "pareto.png").exists()


def test_a_damaged_state_json_is_said_and_ignored(tmp_path: Path, capsys) -> None:
    """state.json only says how the search last stood: report and resume go on without it,
    saying so in one line that names it (resume then stops at the space's real problem)."""
    import yaml

    search = make_search(tmp_path, "st", trials=4, epochs=3, seed=1)
    state = search / "state.json"
    state.write_text("[1, 2]")
    code, out, err = run_cli(capsys, "report", str(search), "--no-mlflow")
    assert code == 0 and not err
    said = [line for line in out.splitlines() if "state.json" in line]
    assert said == [
        f"searchkd: warning: {state} is damaged (not a mapping: [1, 2]); ignored (the next run "
        "rewrites it)"
    ]
    raw = yaml.safe_load((search / "space.yaml").read_text())
    raw["data"] = {"dataset": "cifar10", "root": str(tmp_path / "none"), "val_fraction": 0.1}
    (search / "space.yaml").write_text(yaml.safe_dump(raw))  # stop resume before Ray starts
    for damage in ("garbage {", "", "[1, 2]"):
        state.write_text(damage)
        code, out, err = run_cli(capsys, "resume", str(search))
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 2, err
        assert lines[0].startswith(f"searchkd: warning: {state} is damaged")
        assert lines[1].startswith("searchkd: error: ") and "data.dataset: " in lines[1]


def test_a_damaged_journal_or_space_is_one_line_naming_the_file(tmp_path: Path, capsys) -> None:
    search = make_search(tmp_path, "dj", trials=4, epochs=3, seed=1)
    journal = search / "optuna.journal"
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join([*lines[:5], "not a record\n", *lines[5:]]))
    for command in ("best", "resume"):
        code, _, err = run_cli(capsys, command, str(search))
        assert code == 2 and err.count("\n") == 1, (command, err)
        assert f"{journal}: line 6 is not a journal record" in err, (command, err)
    code, out, _ = run_cli(capsys, "report", str(search), "--no-mlflow")
    assert code == 1 and f"was not written: {journal}: line 6" in out

    search = make_search(tmp_path, "ds", trials=4, epochs=3, seed=1)
    (search / "space.yaml").write_text("name: [unclosed\n")
    for command in ("best", "resume", "final"):
        code, _, err = run_cli(capsys, command, str(search))
        assert code == 2 and err.count("\n") == 1, (command, err)
        assert f"{search / 'space.yaml'}: YAML syntax error" in err, (command, err)


def test_final_of_a_read_only_search_directory_is_one_line(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    search = make_search(tmp_path, "ro", trials=4, epochs=3, seed=1)
    search.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: the check is asked as a user would be answered
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m: real(p, m) and Path(p) != search)
    try:
        code, _, err = run_cli(capsys, "final", str(search))
    finally:
        search.chmod(0o755)
    assert code == 2 and err.count("\n") == 1, err
    assert f"the search directory {search} is not writable: no write permission" in err
    assert not (search / "final").exists()
