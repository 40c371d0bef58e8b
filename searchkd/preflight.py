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
from typing import TYPE_CHECKING

from .spec import Spec

if TYPE_CHECKING:
    from .engine import DataShape

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
    problems += size_problems(spec, shape, against_this_machine=local)
    if local:
        _resources(spec, num_cpus, problems)
    return problems, warnings


def writable_problem(root: Path, what: str = "trials directory") -> str | None:
    """Why the trials directory (or another, `what`) could not be written (nothing is created
    to find out)."""
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{what} {root} is not writable: {existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{what} {root} is not writable: no write permission on {existing}"
    return None


def _data(spec: Spec, problems: list[str], warnings: list[str]) -> DataShape | None:
    from . import data as data_lib
    from .engine import DataShape

    d = spec.data
    try:
        shape = DataShape.of(spec)
    except data_lib.DatasetNotFound as exc:
        problems.append(f"data.dataset: {exc}")
        return None
    if shape.num_train < FEW_TRAINING_IMAGES and d.val_fraction > 0:
        warnings.append(
            f"data.val_fraction: {d.val_fraction:g} leaves {shape.num_train} training images"
        )
    if spec.train.batch_size >= shape.num_train:
        warnings.append(
            f"train.batch_size: {spec.train.batch_size} is not smaller than the training split "
            f"({shape.num_train} images): one step per epoch"
        )
    return shape


def teacher_problems(spec: Spec) -> list[str]:
    """Whether the teacher checkpoint loads into its declared arch (`searchkd validate` asks the
    same as `tune`); with the dataset absent it is only read, the dataset's own problem being
    `tune`'s to report."""
    problems: list[str] = []
    if spec.teacher.checkpoint:
        _teacher(spec, _data(spec, [], []), problems)
    return problems


def _teacher(spec: Spec, shape: DataShape | None, problems: list[str]) -> None:
    if not spec.teacher.checkpoint:
        return
    from .engine import CheckpointMismatch, load_weights, read_checkpoint
    from .models import build_model
    from .spec import checkpoint_problem

    path = Path(spec.teacher.checkpoint)
    problem = checkpoint_problem(path)
    if problem:
        problems.append(f"teacher.checkpoint: {problem}")
        return
    try:
        if shape is None:  # without the data's shape, at least check that it reads
            read_checkpoint(path, path)
        else:
            load_weights(
                build_model(spec.teacher.arch, width=spec.teacher.width, **shape.model_kwargs), path
            )
    except CheckpointMismatch as exc:
        problems.append(f"teacher.checkpoint: {exc}")


NOMINAL_SHAPE = (10, 3, 32)  # classes, channels, image size: sizes a model when its data is away


def memory_share(spec: Spec) -> tuple[int, str]:
    """The memory one trial may use on this machine, and what it is, for messages: its share of
    a GPU (search.resources.gpu), else this machine's RAM."""
    import torch

    gpu = spec.search.resources.gpu
    if gpu > 0 and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        share = int(total * min(gpu, 1.0))
        return share, f"a trial's share of the GPU ({share / 2**30:.1f} GiB)"
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return total, f"this machine's memory ({total / 2**30:.1f} GiB)"


def size_problems(
    spec: Spec, shape: DataShape | None, against_this_machine: bool = True
) -> list[str]:
    """The teacher and the largest students the space can sample, sized on the meta device
    (nothing allocated): one line for each that cannot be built at all (a width like 1e9) or
    that needs more memory to train than a trial has here (estimated from weights, gradients,
    optimizer state and a batch's activations: a lower bound)."""
    from .engine import DataShape, TooLarge, largest_students, model_train_bytes

    if shape is None:
        shape = DataShape(*NOMINAL_SHAPE, resident_bytes=0)
    share, where = memory_share(spec)
    t = spec.teacher
    models = [("teacher.width", t.arch, t.width, None, t.train)]
    models += [
        (key, s.student.arch, s.student.width, s.student.depth, s.train)
        for key, s in largest_students(spec)
    ]
    problems = []
    for key, arch, width, depth, cfg in models:
        batch = (cfg or spec.train).batch_size
        try:
            need = model_train_bytes(arch, width, shape, batch, cfg, depth)
        except TooLarge as exc:
            problems.append(f"{key}: {exc}")
            continue
        if against_this_machine and need > share:
            problems.append(
                f"{key}: {width:g} makes {arch} need about {need / 2**30:,.0f} GiB to "
                f"{'train' if cfg else 'run'} on a batch of {batch} (estimated), more than {where}"
            )
    return problems


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
