"""Teachers: trained once from a recipe (or taken from a checkpoint), cached by content.

A search never retrains its teacher. A recipe-trained teacher lives at
`<cache>/<digest>/teacher.pt` where the digest covers the data, the arch and the recipe, so
any search that asks for the same teacher reuses it. Its test accuracy is measured once and
written beside it (`meta.json`); a user checkpoint gets the same treatment keyed by its bytes.
Files are written to a temporary name and renamed, so a kill never leaves half a teacher.
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock

from .engine import Engine, load_weights
from .record import Log
from .spec import Spec, teacher_digest, teacher_key
from .storage import replace_atomically


@dataclass(frozen=True)
class TeacherInfo:
    path: Path
    digest: str
    test_acc: float
    val_acc: float
    arch: str
    trained: bool  # False when it came from a user checkpoint


def _teacher_spec(spec: Spec) -> Spec:
    """The spec that trains the teacher itself: CE on its arch with its own recipe."""
    raw = spec.model_dump(by_alias=True, exclude_none=True)
    raw.update(objective="ce", loss={}, params={})
    raw["student"] = {"arch": spec.teacher.arch, "width": spec.teacher.width}
    if spec.teacher.train is not None:
        raw["train"] = spec.teacher.train.model_dump()
    return Spec.model_validate(raw)


def _bytes(obj: object) -> bytes:
    """torch.save into memory: written to disk with a plain write, a full disk is an OSError
    (torch.save straight to a file reports it as an opaque RuntimeError)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def ensure_teacher(
    spec: Spec, cache: Path, device: str | None = None, log: Log = print
) -> TeacherInfo:
    """Return the spec's teacher, training and caching it first if needed."""
    ckpt = Path(spec.teacher.checkpoint).expanduser().resolve() if spec.teacher.checkpoint else None
    digest = teacher_digest(spec)
    home = cache / digest
    meta_path = home / "meta.json"
    if meta_path.exists():
        return _read_meta(meta_path, digest)
    # Build first: a missing dataset or a checkpoint that does not fit fails here, before
    # anything is written to the cache.
    tspec = _teacher_spec(spec)
    engine = Engine(tspec, seed=spec.search.seed, device=device)
    if ckpt is not None:
        load_weights(engine.student, ckpt)
    home.mkdir(parents=True, exist_ok=True)
    with FileLock(str(home / ".lock")):
        if meta_path.exists():  # another process finished it while we waited
            return _read_meta(meta_path, digest)
        start = time.perf_counter()
        if ckpt is None:
            path = home / "teacher.pt"
            partial = home / "partial.pt"  # per-epoch state: a killed teacher run goes on, not over
            if partial.exists():
                engine.load(partial)
                log(
                    f"resuming teacher {spec.teacher.arch} at epoch "
                    f"{engine.epoch}/{tspec.train.epochs}"
                )
            else:
                log(
                    f"training teacher {spec.teacher.arch} ({tspec.train.epochs} epochs, once; "
                    f"cached in {os.path.relpath(home)})"
                )
            while not engine.finished:
                row = engine.run_epoch()
                replace_atomically(partial, lambda p: p.write_bytes(engine.to_bytes()))
                log(
                    f"  teacher epoch {engine.epoch}/{tspec.train.epochs}: train_loss "
                    f"{row['train_loss']:.4f}, val_acc {row['val_acc']:.4f}"
                )
            engine.student.load_state_dict(engine.best_student)
            replace_atomically(
                path, lambda p: p.write_bytes(_bytes({"model": engine.student.state_dict()}))
            )
        else:
            path = ckpt
        val, test = engine.evaluate("val").top1, engine.evaluate("test").top1
        # A trained teacher is stored relative to its cache entry, so a moved trials/ still finds
        # it.
        stored = path.name if ckpt is None else str(path)
        meta = {
            "path": stored,
            "test_acc": test,
            "val_acc": val,
            "arch": spec.teacher.arch,
            "trained": ckpt is None,
            "key": teacher_key(spec),
            "seconds": time.perf_counter() - start,
        }
        replace_atomically(meta_path, lambda p: p.write_text(json.dumps(meta, indent=2)))
        (home / "partial.pt").unlink(missing_ok=True)
        log(f"teacher {spec.teacher.arch}: test_acc {test:.4f} (val {val:.4f})")
        return TeacherInfo(path, digest, test, val, spec.teacher.arch, ckpt is None)


def _read_meta(path: Path, digest: str) -> TeacherInfo:
    meta = json.loads(path.read_text())
    return TeacherInfo(
        path.parent / meta["path"],
        digest,
        meta["test_acc"],
        meta["val_acc"],
        meta["arch"],
        meta["trained"],
    )
