"""What `searchkd tune` checks before it takes the search's lock, starts Ray or writes
anything: every problem it can know, reported together (one line each), so a user fixes a
space file in one pass instead of one problem per Ray start.

Checked: the trials directory is writable, the tracking server answers, the dataset is there
(or downloadable), the teacher checkpoint is a weights-only checkpoint that fits its arch,
and, without a cluster, that one trial's resources fit this machine (with `search.pack`, that
its cohort's estimated memory fits its GPU share). Warned about: a batch as
large as the training split, and a validation split that leaves few training images.
"""

from __future__ import annotations

import os
from pathlib import Path

from .spec import Spec

FEW_TRAINING_IMAGES = 100  # below this a validation split leaves a search little to learn from


def check(
    spec: Spec, root: Path, tracking_uri: str | None, local: bool, num_cpus: int | None
) -> tuple[list[str], list[str]]:
    """(problems, warnings), each a list of one-line messages ("KEY: what is wrong")."""
    problems: list[str] = []
    warnings: list[str] = []
    where = writable_problem(root)
    if where:
        problems.append(where)
    if tracking_uri:
        from .tracking import check_reachable, one_line

        try:
            check_reachable(tracking_uri)
        except Exception as exc:  # noqa: BLE001 - connection refused, DNS, HTTP errors: one line
            problems.append(f"--tracking-uri {tracking_uri}: not reachable ({one_line(exc)})")
    shape = _data(spec, problems, warnings)
    _teacher(spec, shape, problems)
    if local:
        _resources(spec, num_cpus, problems)
    return problems, warnings


def writable_problem(root: Path) -> str | None:
    """Why the trials directory could not be written (nothing is created to find out)."""
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"trials directory {root} is not writable: {existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"trials directory {root} is not writable: no write permission on {existing}"
    return None


def _data(spec: Spec, problems: list[str], warnings: list[str]) -> dict | None:
    from . import data as data_lib

    d = spec.data
    try:
        loaders = data_lib.build_loaders(
            d.dataset,
            root=d.root,
            download=d.download,
            val_fraction=d.val_fraction,
            batch_size=spec.train.batch_size,
            device="cpu",
            seed=0,
            **d.options,
        )
    except data_lib.DatasetNotFound as exc:
        problems.append(f"data.dataset: {exc}")
        return None
    if loaders.num_train < FEW_TRAINING_IMAGES and d.val_fraction > 0:
        warnings.append(
            f"data.val_fraction: {d.val_fraction:g} leaves {loaders.num_train} training images"
        )
    if spec.train.batch_size >= loaders.num_train:
        warnings.append(
            f"train.batch_size: {spec.train.batch_size} is not smaller than the training split "
            f"({loaders.num_train} images): one step per epoch"
        )
    return dict(
        num_classes=loaders.num_classes, in_channels=loaders.channels, image_size=loaders.image_size
    )


def teacher_problems(spec: Spec) -> list[str]:
    """Whether the teacher checkpoint loads into its declared arch (`searchkd validate` asks the
    same as `tune`); with the dataset absent it is only read, the dataset's own problem being
    `tune`'s to report."""
    problems: list[str] = []
    if spec.teacher.checkpoint:
        _teacher(spec, _data(spec, [], []), problems)
    return problems


def _teacher(spec: Spec, shape: dict | None, problems: list[str]) -> None:
    if not spec.teacher.checkpoint:
        return
    from .engine import CheckpointMismatch, load_weights, read_checkpoint
    from .models import build_model

    path = Path(spec.teacher.checkpoint)
    if not path.is_file():
        problems.append(f"teacher.checkpoint: no such file {path}")
        return
    try:
        if shape is None:  # without the data's shape, at least check that it reads
            read_checkpoint(path, path)
        else:
            load_weights(build_model(spec.teacher.arch, width=spec.teacher.width, **shape), path)
    except CheckpointMismatch as exc:
        problems.append(f"teacher.checkpoint: {exc}")


def _resources(spec: Spec, num_cpus: int | None, problems: list[str]) -> None:
    import torch

    want = spec.search.resources
    cpus = num_cpus or os.cpu_count() or 1
    gpus = torch.cuda.device_count()
    if want.cpu > cpus:
        problems.append(
            f"search.resources.cpu: {want.cpu:g} per trial but this machine has {cpus} CPUs"
            + (" (--num-cpus)" if num_cpus else "")
        )
    if want.gpu > gpus:
        problems.append(
            f"search.resources.gpu: {want.gpu:g} per trial but this machine has "
            + (f"{gpus} GPUs" if gpus else "no GPU; set it to 0 to train on the CPU")
        )
    elif spec.search.pack > 1 and want.gpu > 0:
        problem = pack_memory(spec, torch.cuda.get_device_properties(0).total_memory)
        if problem:
            problems.append(problem)


def pack_memory(spec: Spec, total_bytes: int) -> str | None:
    """Why a cohort of `search.pack` students does not fit a trial's GPU share, estimated on
    this machine's CPU for the widest student the space can sample, under each objective."""
    import io

    import torch

    from .engine import Cohort, estimate_pack_bytes, pack_memory_problem
    from .models import build_model
    from .objectives import get_objective

    widths = spec.params.get("student.width")
    width = max([spec.student.width, *(widths.values_to_check() if widths else [])])
    worst = 0
    for objective in spec.objectives:
        raw = spec.model_dump(by_alias=True, exclude_none=True)
        raw.update(objective=objective, loss=get_objective(objective).own_loss(spec.loss))
        raw["student"]["width"] = width
        one = Spec.model_validate(raw)
        weights = None
        if get_objective(objective).needs_teacher:  # any weights of the right shape will do
            from . import data as data_lib

            d = spec.data
            L = data_lib.build_loaders(
                d.dataset,
                root=d.root,
                download=False,
                val_fraction=d.val_fraction,
                batch_size=spec.train.batch_size,
                device="cpu",
                seed=0,
                **d.options,
            )
            teacher = build_model(
                spec.teacher.arch,
                width=spec.teacher.width,
                num_classes=L.num_classes,
                in_channels=L.channels,
                image_size=L.image_size,
            )
            buf = io.BytesIO()
            torch.save(teacher.state_dict(), buf)
            weights = buf.getvalue()
        cohort = Cohort([one], [0], teacher_checkpoint=weights, device="cpu")
        worst = max(worst, estimate_pack_bytes(cohort, spec.search.pack))
    fraction = spec.search.resources.gpu
    return pack_memory_problem(
        worst, spec.search.pack, total_bytes, fraction if fraction < 1 else None
    )
