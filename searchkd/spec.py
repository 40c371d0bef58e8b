"""The space file: one YAML per search, parsed safely and validated before anything runs.

Every mistake a user can make in a space file becomes one `SpecError` line naming the file
and the key; the command line turns it into `searchkd: error: ...` and exit 2. Objective
tunables are validated through a lookup the caller passes in, so this layer imports nothing
of the rest of searchkd.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import math
import os
import re
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .metrics import REPORTED_METRICS, TEST_METRICS, VAL_METRICS

SEED_LIMIT = 2**64  # torch.manual_seed takes seeds below this


class SpecError(ValueError):
    """A user mistake in a space file: `str(err)` is the one line to show."""


class _Strict(BaseModel):
    # NaN and infinity are never a setting: they would only surface as a failed trial.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class DataSpec(_Strict):
    dataset: str = "digits"
    root: str | None = None
    download: bool = False
    # 0: no validation split, every training image is trained on (the published tables'
    # protocol); only a run that selects nothing on val may use it (see `validate`).
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    options: dict[str, Any] = Field(default_factory=dict)


class TrainSpec(_Strict):
    epochs: int = Field(240, ge=1)
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False  # plain momentum, as the KD literature's recipe
    weight_decay: float = Field(5.0e-4, ge=0.0)
    lr_schedule: Literal["multistep", "cosine"] = "multistep"
    lr_milestones: list[int] = Field(default_factory=list)
    lr_gamma: float = Field(0.1, gt=0.0)
    precision: Literal["fp32", "bf16"] = "bf16"
    compile: bool = False

    @field_validator("lr_milestones")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if any(m <= 0 for m in v) or v != sorted(set(v)):
            raise ValueError("must be strictly increasing positive epochs")
        return v

    @model_validator(mode="after")
    def _nesterov(self) -> TrainSpec:
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError("nesterov applies to optimizer sgd with momentum > 0")
        return self


class TeacherSpec(_Strict):
    arch: str
    width: float = Field(1.0, gt=0.0)
    checkpoint: str | None = None
    train: TrainSpec | None = None

    @model_validator(mode="after")
    def _one_source(self) -> TeacherSpec:
        if self.checkpoint is None and self.train is None:
            raise ValueError("give teacher.checkpoint or teacher.train (a recipe to train it once)")
        return self


class StudentSpec(_Strict):
    arch: str
    width: float = Field(1.0, gt=0.0)
    depth: int | None = Field(None, ge=1)


class ResourcesSpec(_Strict):
    cpu: float = Field(1.0, gt=0.0)
    gpu: float = Field(0.0, ge=0.0)


class SearchSpec(_Strict):
    num_samples: int = Field(16, ge=1)
    metric: str | list[str] = "val_acc"
    mode: Literal["max", "min"] | list[Literal["max", "min"]] = "max"
    sampler: str = "tpe"  # a name in the sampler registry (searchkd/samplers.py)
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(3.0, gt=1.0)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    max_concurrent: int = Field(0, ge=0)  # 0: as many as the resources allow
    max_failures: int = Field(0, ge=0)
    seed: int = 0  # [0, 2**64): what torch's generators take
    # Where trials write their state and best students: a path every node sees (default: the
    # local trials directory) or a pyarrow filesystem URI (s3://bucket/prefix?endpoint_override=...).
    storage: str | None = None
    # Students per Ray Tune trial (a cohort): they train over the same batches with one
    # teacher forward per batch; each is still its own Optuna trial, MLflow run and rows.
    pack: int = Field(1, ge=1, le=64)
    # Decisions by trial number, not timing (samplers.seen_by, scheduler.OrderedRungs): the same
    # trials, stops and winner however many run at once, however loaded, however interrupted.
    # false: Ray Tune's asynchronous search (no waiting; decisions depend on timing).
    reproducible: bool = True

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int) -> int:
        if not 0 <= v < SEED_LIMIT:
            raise ValueError(f"must be in [0, 2**64), got {cut(str(v))}")
        return v

    @model_validator(mode="after")
    def _metrics(self) -> SearchSpec:
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        modes = self.mode if isinstance(self.mode, list) else [self.mode]
        if len(metrics) != len(modes):
            raise ValueError("search.metric and search.mode must have the same length")
        if len(metrics) > 1 and self.scheduler == "asha":
            raise ValueError(
                "ASHA stops trials on one metric: set scheduler: none for several metrics"
            )
        return self


class ParamSpec(_Strict):
    """One searched value: exactly one of choice / float / int."""

    choice: list[Any] | None = None
    float_: list[float] | None = Field(None, alias="float")
    int_: list[int] | None = Field(None, alias="int")
    log: bool = False
    step: float | None = Field(None, gt=0)

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=True)

    @model_validator(mode="after")
    def _one_kind(self) -> ParamSpec:
        kinds = [k for k in ("choice", "float_", "int_") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(
                "give exactly one of choice: [...], float: [low, high], int: [low, high]"
            )
        if self.choice is not None:
            if not self.choice:
                raise ValueError("choice must list at least one value")
            if self.log or self.step is not None:
                raise ValueError("log and step apply to float/int ranges, not choice")
            return self
        low, high = self.float_ if self.float_ is not None else self.int_  # type: ignore[misc]
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"range bounds must be finite numbers, got [{low}, {high}]")
        if self.int_ is not None and self.step is not None and self.step != int(self.step):
            raise ValueError(f"the step of an int range is a whole number, got {self.step:g}")
        if low > high:
            raise ValueError(f"range low {low} > high {high}")
        if self.log and low <= 0:
            raise ValueError(f"log range must be > 0, got low {low}")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        return self

    @field_validator("float_", "int_")
    @classmethod
    def _pair(cls, v: list | None) -> list | None:
        if v is not None and len(v) != 2:
            raise ValueError("a range is [low, high]")
        return v

    @property
    def kind(self) -> str:
        return (
            "choice" if self.choice is not None else "float" if self.float_ is not None else "int"
        )

    def values_to_check(self) -> list[Any]:
        """Values whose validity can be checked up front: each choice, or both range ends."""
        if self.choice is not None:
            return list(self.choice)
        return list(self.float_ if self.float_ is not None else self.int_)  # type: ignore[arg-type]


class FinalSpec(_Strict):
    """The final stage run when the search ends (`searchkd final` does it by hand): the `top`
    configs and the default one retrained on train + val with `seeds` seeds each, on test."""

    top: int = Field(3, ge=1)
    seeds: int = Field(3, ge=1)


class ObjectiveChoice(_Strict):
    choice: list[str] = Field(min_length=1)


NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Spec(_Strict):
    name: str
    objective: str | ObjectiveChoice
    data: DataSpec = Field(default_factory=DataSpec)
    teacher: TeacherSpec
    student: StudentSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    loss: dict[str, Any] = Field(default_factory=dict)
    search: SearchSpec = Field(default_factory=SearchSpec)
    params: dict[str, ParamSpec] = Field(default_factory=dict)
    final: FinalSpec | None = None  # absent: the search ends without a final stage

    @field_validator("name")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not NAME_RE.match(v) or v in {".", ".."}:
            raise ValueError("must be letters, digits, '_', '-', '.' (it names a directory)")
        return v

    @property
    def objectives(self) -> list[str]:
        return (
            list(self.objective.choice)
            if isinstance(self.objective, ObjectiveChoice)
            else [self.objective]
        )

    @property
    def metrics(self) -> list[str]:
        return self.search.metric if isinstance(self.search.metric, list) else [self.search.metric]

    @property
    def modes(self) -> list[str]:
        return self.search.mode if isinstance(self.search.mode, list) else [self.search.mode]

    def resolved(self, values: Mapping[str, Any]) -> Spec:
        """This spec with dotted `values` (e.g. a trial's sampled params) written into it."""
        raw = self.model_dump(by_alias=True, exclude_none=True)
        for key, value in values.items():
            section, _, leaf = key.partition(".")
            if key == "objective":
                raw["objective"] = value
            elif section in {"student", "train", "data", "loss"} and leaf:
                raw.setdefault(section, {})[leaf] = copy.deepcopy(value)
        return Spec.model_validate(raw)

    def to_yaml(self) -> str:
        return yaml.safe_dump(
            self.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=False
        )


# Sections whose fields `params` may search (dotted keys); loss.* is checked per objective.
SEARCHABLE = {"student": StudentSpec, "train": TrainSpec, "data": DataSpec}

# (objective name) -> checker(key, value) raising KeyError/ValueError; provided by the caller
TunableCheck = Callable[[str, str, Any], Any]


def _fmt_loc(loc: tuple) -> str:
    parts = [str(p) for p in loc if not (isinstance(p, str) and p in {"str", "ObjectiveChoice"})]
    return ".".join(p.removesuffix("_") if p in {"float_", "int_"} else p for p in parts)


def _first_error(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = _fmt_loc(e["loc"])
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    elif e["type"] == "missing":
        msg = "required key is missing"
    loc = cut(loc)
    return f"{loc}: {msg}" if loc else msg


MAX_SPACE_BYTES = 1 << 20  # a space file is a page of YAML; anything near this is not one
MAX_SHOWN = 80  # characters of a user's value quoted back in a message


def cut(text: str) -> str:
    """User text in a message, cut to MAX_SHOWN characters."""
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


def shown(value: Any) -> str:
    """A user's value as quoted in a message, cut to MAX_SHOWN characters."""
    return cut(repr(value))


def parse(text: str, source: str = "<space>") -> dict[str, Any]:
    """Safe YAML without aliases: `*name` references can expand a small file into gigabytes
    ("billion laughs"), and a space never needs them."""
    if len(text.encode()) > MAX_SPACE_BYTES:
        raise SpecError(
            f"{source}: a space file is at most {MAX_SPACE_BYTES >> 20} MiB; this one is "
            f"{len(text.encode()) / (1 << 20):.1f} MiB"
        )
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                line = event.start_mark.line + 1
                raise SpecError(
                    f"{source}: YAML alias *{event.anchor[:40]} (line {line}): aliases are not "
                    f"allowed in a space file; write the value out"
                )
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise SpecError(f"{source}: YAML syntax error{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a space file is a YAML mapping (name:, objective:, ...)")
    return raw


def validate(
    raw: Mapping[str, Any],
    source: str = "<space>",
    *,
    objectives: Mapping[str, Mapping[str, Any]] | None = None,
    models: list[str] | None = None,
    datasets: list[str] | None = None,
    samplers: list[str] | None = None,
    dataset_options: Mapping[str, set[str]] | None = None,
    check_tunable: TunableCheck | None = None,
    check_dataset_option: TunableCheck | None = None,
    term_weights: Mapping[str, Mapping[str, float]] | None = None,
) -> Spec:
    """Validate a parsed space. The lookups (known objectives with their tunables and the
    weights of their loss terms with their defaults, model, dataset and sampler names, a
    tunable and a dataset-option checker) come from the layers that own them."""
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(f"{source}: {_first_error(exc)}") from None

    def fail(key: str, msg: str) -> None:
        raise SpecError(f"{source}: {key}: {msg}")

    if objectives is not None:
        for name in spec.objectives:
            if name not in objectives:
                fail(
                    "objective",
                    f"unknown objective {shown(name)}; known: {', '.join(sorted(objectives))}",
                )
    if models is not None:
        for key, arch in (("teacher.arch", spec.teacher.arch), ("student.arch", spec.student.arch)):
            if arch not in models:
                fail(key, f"unknown arch {shown(arch)}; known: {', '.join(models)}")
    if datasets is not None and spec.data.dataset not in datasets:
        fail(
            "data.dataset",
            f"unknown dataset {shown(spec.data.dataset)}; known: {', '.join(datasets)}",
        )
    if samplers is not None and spec.search.sampler not in samplers:
        fail(
            "search.sampler",
            f"unknown sampler {shown(spec.search.sampler)}; known: {', '.join(samplers)}",
        )
    if dataset_options is not None and spec.data.dataset in dataset_options:
        valid = dataset_options[spec.data.dataset]
        for key in spec.data.options:
            if key not in valid:
                fail(
                    f"data.options.{cut(str(key))}",
                    f"not an option of dataset {spec.data.dataset}; valid: "
                    f"{', '.join(sorted(valid)) or 'none'}",
                )
            if check_dataset_option is not None:
                try:
                    check_dataset_option(spec.data.dataset, key, spec.data.options[key])
                except ValueError as exc:
                    fail(f"data.options.{key}", str(exc))

    if objectives is not None:
        own = set().union(*(objectives[o] for o in spec.objectives))
        for key, value in spec.loss.items():
            if key not in own:
                which = spec.objective if isinstance(spec.objective, str) else spec.objectives
                fail(
                    f"loss.{key}",
                    f"unknown key for objective {which}; valid: {', '.join(sorted(own))}",
                )
            if check_tunable is not None:
                for o in spec.objectives:
                    if key in objectives[o]:
                        _check(fail, check_tunable, o, f"loss.{key}", key, value)

    for o in spec.objectives if term_weights is not None else []:
        weights = term_weights.get(o, {})  # type: ignore[union-attr]
        if weights and all(_can_be_zero(spec, k, d) for k, d in weights.items()):
            fail(
                "loss",
                f"objective {o} can have every term weighted 0 "
                f"({', '.join(f'{k}: 0' for k in weights)}): a trial would have no loss to train "
                "on; give one of them a weight > 0",
            )

    for key, param in spec.params.items():
        section, _, leaf = key.partition(".")
        if key == "objective":
            fail("params.objective", "search objectives with objective: {choice: [...]}")
        if section == "loss":
            if objectives is None:
                continue
            owners = [o for o in spec.objectives if leaf in objectives[o]]
            if not owners:
                valid = sorted(set().union(*(objectives[o] for o in spec.objectives)))
                fail(f"params.{key}", f"unknown loss key {shown(leaf)}; valid: {', '.join(valid)}")
            if check_tunable is not None:
                for o in owners:
                    for v in param.values_to_check():
                        _check(fail, check_tunable, o, f"params.{key}", leaf, v)
        elif section in SEARCHABLE and leaf in SEARCHABLE[section].model_fields:
            for v in param.values_to_check():
                try:
                    spec.resolved({key: v})
                except ValidationError as exc:
                    fail(
                        f"params.{key}", f"value {shown(v)}: {_first_error(exc).split(': ', 1)[-1]}"
                    )
        else:
            fail(f"params.{key}", "not a searchable key; use student.*, train.*, data.* or loss.*")
        if spec.search.pack > 1 and (section == "data" or key in PACK_SHARED):
            fail(
                f"params.{key}",
                f"the students of a packed trial (search.pack: {spec.search.pack}) share the "
                "data, batch size, epochs and precision; search it with pack: 1",
            )

    for metric in spec.metrics:
        if metric not in REPORTED_METRICS and not metric.startswith("loss_"):
            fail(
                "search.metric",
                f"{shown(metric)} is not reported by trials; reported: "
                f"{', '.join(REPORTED_METRICS)}",
            )
        if metric in VAL_METRICS and _may_lack_val(spec):
            fail(
                "search.metric",
                f"{shown(metric)} is measured on the validation split, but data.val_fraction "
                "can be 0 (no validation split): set it > 0, or run a single trial that selects "
                "nothing with metric test_acc_last",
            )
        if metric in TEST_METRICS and not _selects_nothing(spec):
            fail(
                "search.metric",
                f"{shown(metric)} is measured on the test split, which must never choose: "
                "select on val_acc (only a single trial with no params may report it as its "
                "metric)",
            )
    return spec


# Train keys every student of a cohort shares (with data.*): they train over the same batches.
PACK_SHARED = ("train.batch_size", "train.epochs", "train.precision", "train.compile")


def _can_be_zero(spec: Spec, key: str, default: float) -> bool:
    """Whether a trial can get loss weight `key` at 0: fixed at 0 (or its default 0 unset),
    or searched over values that hold 0 (a choice, an int range, a stepped or empty float one;
    a continuous draw from [0, high] is never exactly 0)."""
    p = spec.params.get(f"loss.{key}")
    if p is None:
        value = spec.loss.get(key, default)
        return isinstance(value, int | float) and value == 0
    if p.choice is not None:
        return any(isinstance(v, int | float) and v == 0 for v in p.choice)
    low, high = p.float_ if p.float_ is not None else p.int_  # type: ignore[misc]
    if p.int_ is not None or p.step is not None:
        return low <= 0
    return high <= 0


def _may_lack_val(spec: Spec) -> bool:
    """val_fraction is 0, or a searched val_fraction can be."""
    searched = spec.params.get("data.val_fraction")
    return spec.data.val_fraction == 0 or (searched is not None and 0 in searched.values_to_check())


def _selects_nothing(spec: Spec) -> bool:
    """One trial of one objective with no searched params: no value of any metric chooses."""
    return spec.search.num_samples == 1 and not spec.params and isinstance(spec.objective, str)


def _check(
    fail: Callable, check: TunableCheck, objective: str, where: str, key: str, value: Any
) -> None:
    try:
        check(objective, key, value)
    except (KeyError, ValueError) as exc:
        fail(where, str(exc).strip("'\""))


def students_of(config: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """Each student's trial config by its Optuna trial number: a packed trial's (`students`),
    or the trial's own config (an unpacked trial is one student)."""
    if "students" in config:
        return {int(c["trial_number"]): dict(c) for c in config["students"]}
    return {int(config.get("trial_number", -1)): dict(config)}


def file_problem(path: str | Path) -> str | None:
    """Why `path` is not a regular file to read (None when it is), said as what it is: a
    directory, a FIFO or a device is named so, never "no such file", and nothing is opened
    (reading a FIFO or /dev/zero would hang)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "no such file"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symlink loop"
        return exc.strerror or type(exc).__name__
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if stat.S_ISFIFO(mode):
        return "is a named pipe (FIFO), not a file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a file"
    return "is not a regular file"


def checkpoint_problem(path: Path) -> str | None:
    """Why a teacher checkpoint cannot be read, naming it (None when it is a file)."""
    problem = file_problem(path)
    if problem is None:
        return None
    return f"no such file {path}" if problem == "no such file" else f"{path} {problem}"


def resolve_path(path: str | Path, what: str) -> Path:
    """`path` with `~` expanded, made absolute and its links followed; a symlink loop is one
    SpecError line naming `what` (a space key or an option) instead of a RuntimeError."""
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as exc:
        detail = "a symlink loop" if "loop" in str(exc).lower() else str(exc)
        raise SpecError(f"{what} {path}: {detail}") from None


def load(path: str | Path, **lookups: Any) -> Spec:
    """Read, parse and validate a space file; every failure is one SpecError line."""
    p = Path(path)
    source = str(path)
    problem = file_problem(p)
    if problem == "no such file":
        raise SpecError(f"{source}: no such space file")
    if problem:
        raise SpecError(f"{source}: {problem}; a space file is a YAML file")
    try:
        text = p.read_text()
    except OSError as exc:
        raise SpecError(f"{source}: cannot read: {exc.strerror}") from None
    return validate(parse(text, source), source, **lookups)


def teacher_key(spec: Spec) -> dict[str, Any]:
    """What a cached teacher depends on: the data, its arch and width, and either the recipe
    that trains it (with the search seed) or the content of the checkpoint that holds it."""
    t = spec.teacher
    key: dict[str, Any] = {
        "data": spec.data.model_dump(mode="json"),
        "arch": t.arch,
        "width": t.width,
    }
    if t.checkpoint:
        h = hashlib.sha256()
        with Path(t.checkpoint).expanduser().open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        key["file"] = h.hexdigest()[:16]
    else:
        key.update(
            recipe=t.train.model_dump(mode="json") if t.train else None, seed=spec.search.seed
        )
    return key


def teacher_digest(spec: Spec) -> str:
    """The teacher cache's directory name (`trials/teachers/<digest>/`): a report finds the
    teacher's accuracy there without importing torch."""
    return hashlib.sha256(json.dumps(teacher_key(spec), sort_keys=True).encode()).hexdigest()[:16]
