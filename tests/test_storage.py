"""The storage trials write to: a local path or an object store, through one pyarrow layer."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from searchkd.storage import Storage, StorageError, normalize


def test_local_files_are_written_whole_and_listed(tmp_path: Path) -> None:
    store = Storage(str(tmp_path / "s"))
    assert store.read_bytes("a/state.pt") is None and store.list() == [] and not store.exists()
    store.write_bytes("a/state.pt", b"one")
    store.write_bytes("a/state.pt", b"two")  # replaced, not appended
    assert store.read_bytes("a/state.pt") == b"two"
    assert store.list() == ["a"] and store.list("a") == ["state.pt"]  # no temporary file left
    assert store.child("a").read_bytes("state.pt") == b"two"
    store.delete("a")
    assert store.list() == [] and not store.exists("a")
    store.delete("a")  # absent is fine


def test_relative_paths_become_absolute(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert normalize("runs") == str(tmp_path / "runs")
    assert normalize("s3://b/p?x=1") == "s3://b/p?x=1"
    assert Storage("runs").uri == str(tmp_path / "runs")


def test_uri_children_keep_options_and_secrets_are_masked() -> None:
    store = Storage(
        "s3://bucket/pre?endpoint_override=10.0.0.1:9000&secret_key=hunter2&scheme=http"
    )
    child = store.child("search-1a2b", "trial-0003")
    assert child.uri == (
        "s3://bucket/pre/search-1a2b/trial-0003?endpoint_override=10.0.0.1:9000"
        "&secret_key=hunter2&scheme=http"
    )
    assert "hunter2" not in child.display and "secret_key=***" in child.display
    assert "endpoint_override=10.0.0.1:9000" in child.display


def test_a_storage_pickles_as_its_uri(tmp_path: Path) -> None:
    store = Storage(str(tmp_path))
    store.write_bytes("x", b"1")  # opens the filesystem
    again = pickle.loads(pickle.dumps(store))
    assert again == store and again.read_bytes("x") == b"1"
    assert pickle.loads(pickle.dumps(store)).__dict__["_fs"] is None


def test_unusable_storage_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(StorageError, match=r"is not writable: .*") as err:
        Storage(str(tmp_path / "file" / "below")).check_writable()
    assert "\n" not in str(err.value)
    with pytest.raises(StorageError, match=r"^storage nosuch://x: "):
        Storage("nosuch://x").check_writable()
    Storage(str(tmp_path / "new")).check_writable()  # creates it; the marker is gone again
    assert list((tmp_path / "new").iterdir()) == []


def test_object_store_through_the_same_layer(s3_server: str) -> None:
    store = Storage(s3_server).child("unit")
    store.check_writable()
    store.write_bytes("trial-0001/state.pt", b"\x00" * 1000)
    store.write_bytes("trial-0001/student_best.pt", b"best")
    assert store.list() == ["trial-0001"]
    assert store.list("trial-0001") == ["state.pt", "student_best.pt"]
    assert store.read_bytes("trial-0001/state.pt") == b"\x00" * 1000
    assert pickle.loads(pickle.dumps(store)).read_bytes("trial-0001/student_best.pt") == b"best"
    store.delete("trial-0001")
    assert store.list() == [] and store.read_bytes("trial-0001/state.pt") is None
