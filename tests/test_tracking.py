"""MLflow bookkeeping after a killed driver: only the runs of trials Tune ran survive."""

from __future__ import annotations

import json
from pathlib import Path

from mlflow.tracking import MlflowClient

from searchkd.tracking import RUNS_FILE, SearchRuns, drop_orphan_runs


def test_orphan_and_duplicate_child_runs_are_dropped(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("s", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp).info.run_id

    def child(trial_id: str) -> str:
        tags = {"mlflow.parentRunId": parent, "trial_id": trial_id}
        return client.create_run(exp, tags=tags).info.run_id

    kept = child("aaa")          # mapped, known to Tune
    forgotten = child("bbb")     # its trial was forgotten by Tune's snapshot
    unmapped = child("aaa")      # created again for a known trial after a kill before the map
    other = client.create_run(exp).info.run_id  # not a child: untouched
    (tmp_path / RUNS_FILE).write_text(json.dumps({"aaa": kept, "bbb": forgotten}))

    assert drop_orphan_runs(SearchRuns(uri, exp, parent), tmp_path, known={"aaa"}) == 2
    alive = {r.info.run_id for r in client.search_runs([exp])}
    assert alive == {parent, kept, other}
    assert unmapped not in alive
    assert json.loads((tmp_path / RUNS_FILE).read_text()) == {"aaa": kept}
