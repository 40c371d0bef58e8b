"""Every figure that needs a GPU, in one run of at most 8 minutes, on the device image as it is.

    python bench/gpu.py --wheels .whl --json $OUT/gpu.json         # on the GPU: bench/README.md
    python bench/gpu.py --device cpu --small --json /tmp/gpu.json  # the dry run (tests)

A GPU is lent for minutes, to a machine that has torch but none of Ray, Optuna, MLflow or
pydantic, and reaches no registry. So this script first installs the carried wheels into a
folder of its own (`--wheels`), then prints in one line what is still missing (preflight), then
runs the steps below in their order of value. Each step runs in its own process group and is
killed at its time box, so a slow step cannot starve the ones after it; a step that ends early
leaves its unused seconds to the next. Each figure is written to the JSON file the moment it is
measured (`{"device": ..., "steps": {name: {"status", "seconds", "limit_s", "figures"}}}`), so a
run cut short still has everything it measured.

Steps (the existing benchmarks, called as functions):
  throughput          engine vs the classic loop, msd and crd pairs, batch 64, eager
  throughput_compile  the engine with train.compile (its reference is the eager step's)
  throughput_b256     engine vs the classic loop at batch 256
  concurrency         1, 2, 4 trial processes sharing the GPU, each capped to 1/k of its memory
  packing             K = 1, 2, 4, 8 msd students over one teacher forward per batch
  fashion_mnist       a short real training: bf16 autocast + TF32 against fp32, same seeds
Every step records the peak memory of each trial it ran; the preflight records the device,
driver, torch, CUDA and cuDNN versions.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib
import importlib.util
import json
import math
import multiprocessing
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
# The device image has no searchkd installed: the working tree is what travels.
for _path in (str(ROOT), str(BENCH)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

# The device image's packages (with what they depend on), from the workplace's notes.
IMAGE = (
    "torch",
    "torchvision",
    "numpy",
    "pandas",
    "pyarrow",
    "scipy",
    "scikit-learn",
    "pyyaml",
    "filelock",
    "matplotlib",
    "pytest",
    "hypothesis",
    "psutil",
)
# What the engine path imports beyond the standard library (import name: distribution). The
# device image has the first group; the second comes as wheels (`--fetch-wheels`): pydantic
# and what it needs, and a typing_extensions new enough for it (the image's is torch's).
ON_IMAGE = {
    "torch": "torch",
    "torchvision": "torchvision",
    "numpy": "numpy",
    "yaml": "pyyaml",
    "filelock": "filelock",
    "PIL": "pillow",
}
CARRIED = {
    "pydantic": "pydantic",
    "pydantic_core": "pydantic-core",
    "annotated_types": "annotated-types",
    "typing_inspection": "typing-inspection",
    "typing_extensions": "typing-extensions",
}
# The modules the steps run; importing them is the preflight's last check.
ENGINE_PATH = (
    "searchkd.engine",
    "searchkd.data",
    "_common",
    "throughput",
    "concurrency",
    "packing",
)
FRAMEWORKS = ("ray", "optuna", "mlflow")  # never on the image; the engine never imports them
# The device's Python (bench/README.md); wheels are fetched for it.
DEVICE_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# Where the carried Fashion-MNIST lives in the working tree: a copy of the Debian package's
# folder of gzip'd files (git-ignored; bench/README.md). The run unpacks it into a folder of
# its own, never into the working tree (what travels must stay small).
FASHION_DIR = ROOT / ".data" / "fashion-mnist"


@dataclass(frozen=True)
class Step:
    name: str
    limit_s: float  # its time box on a GPU, in seconds
    needs_fashion: bool = False


# In order of value. The boxes add up to 450 s; the whole run, wheels and preflight included,
# ends within BUDGET_S of its start: what the preflight leaves of the other 30 s goes to the
# first step.
STEPS = (
    Step("throughput", 95),
    Step("throughput_compile", 115),
    Step("throughput_b256", 55),
    Step("concurrency", 70),
    Step("packing", 55),
    Step("fashion_mnist", 60, needs_fashion=True),
)
BUDGET_S = 480.0
# --small (the CPU dry run): every step gets this box; each takes seconds.
SMALL_LIMIT_S = 240.0

# The measured sizes on a GPU. Throughput: 200 steps of batch 64 (12,800 images) after 30
# warm-up steps, 3 alternations; batch 256 measures as many images (50 steps).
GPU = {
    "throughput": ["--steps", "200", "--repeats", "3"],
    "throughput_compile": ["--steps", "200", "--repeats", "3", "--compile", "--no-reference"],
    "throughput_b256": ["--steps", "50", "--repeats", "3", "--batch-size", "256"],
    "concurrency": ["--procs", "1,2,4", "--steps", "200"],
    "packing": ["--configs", "msd", "--packs", "1,2,4,8", "--steps", "100"],
}
# The dry run: the cheapest pair (wrn_40_2 -> wrn_16_2), batch 4, 10 classes, 40 images, one
# measured step, one thread, one trial process. It proves that every step runs and records
# its figures; the benchmarks' own smoke tests cover their other settings.
TINY = ["--num-classes", "10", "--train-size", "40", "--threads", "1", "--batch-size", "4"]
SMALL = {
    "throughput": [*TINY, "--pairs", "crd", "--steps", "1", "--workers", "1"],
    # torch.compile on a CPU compiles for minutes: the dry run runs this step's code eagerly.
    "throughput_compile": [*TINY, "--pairs", "crd", "--steps", "1", "--no-reference"],
    "throughput_b256": [
        *TINY,
        "--pairs",
        "crd",
        "--steps",
        "1",
        "--workers",
        "1",
        "--batch-size",
        "8",
    ],
    "concurrency": [*TINY, "--pair", "crd", "--procs", "1", "--steps", "1"],
    "packing": ["--small", "--configs", "wrn", "--threads", "1"],
}
# Fashion-MNIST: the same student and recipe in fp32 and in bf16 (autocast, TF32), seeds
# interleaved so that a run cut short still has pairs. `ce` (the student alone): the question
# is the arithmetic of training, not distillation.
FASHION = {
    "student": {"arch": "resnet8x4"},
    "epochs": 3,
    "batch_size": 256,
    "seeds": [0, 1],
    "val_fraction": 0.1,
    "options": {},
}
FASHION_SMALL = {
    "student": {"arch": "resnet8", "width": 0.25},
    "epochs": 1,
    "batch_size": 64,
    "seeds": [0],
    "val_fraction": 0.01,
    "options": {"train_images": 256},
}


def say(line: str) -> None:
    print(line, flush=True)


# ------------------------------------------------------------------ wheels


def fetch_command(folder: Path) -> list[str]:
    """The pip command that fetches the carried wheels for the device's Python, pinned to the
    versions this machine's tests run with."""
    from importlib.metadata import version

    pins = [f"{dist}=={version(dist)}" for dist in CARRIED.values()]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    return [
        sys.executable,
        *("-m", "pip", "download", "--no-deps", "--only-binary=:all:"),
        *("--python-version", DEVICE_PYTHON, "--implementation", "cp"),
        *platforms,
        *("-d", str(folder)),
        *pins,
    ]


def _has_pip() -> bool:
    return importlib.util.find_spec("pip") is not None


def install_wheels(folder: Path, target: Path) -> str:
    """Install every wheel of `folder` into `target` offline and put it first on the path (this
    process, and the processes it starts). With pip, which refuses a wheel built for another
    Python; an interpreter without pip gets each wheel unpacked (a wheel is a zip of its
    files laid out as site-packages holds them)."""
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"gpu.py: --wheels {folder}: no .whl file there")
    target.mkdir(parents=True, exist_ok=True)
    if _has_pip():
        how = "pip"
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
        done = subprocess.run(
            [*pip, "--no-compile", "--target", str(target), *map(str, wheels)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
            why = lines[-1].strip() if lines else f"exit code {done.returncode}"
            raise SystemExit(f"gpu.py: pip could not install the wheels of {folder}: {why}")
    else:
        how = "unpacked: this Python has no pip"
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as z:
                z.extractall(target)
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(target), str(ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    importlib.invalidate_caches()
    return f"wheels: {len(wheels)} from {folder} into {target} ({how})"


# ------------------------------------------------------------------ preflight


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _driver() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout else None
    return None


def preflight(
    device_arg: str, data_root: Path, fashion: bool, fashion_dir: Path | None = None
) -> dict[str, Any]:
    """What is missing, found before any measurement: modules, the device, the data set.

    `problems` lists everything found; `fatal` says whether any measurement can run at all (a
    missing data set only skips the Fashion-MNIST step)."""
    problems: list[str] = []
    missing = []
    for name, dist in {**ON_IMAGE, **CARRIED}.items():
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # it is there, and something it imports is not
                missing.append(f"{name} ({_first_line(exc)})")
            else:
                missing.append(name if dist == name else f"{name} (pip: {dist})")
        except Exception as exc:  # noqa: BLE001 - a broken module raises anything
            missing.append(f"{name} ({_first_line(exc)})")
    if missing:
        problems.append("missing " + ", ".join(missing))
    info: dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable}
    broken = []
    if not missing:
        for name in ENGINE_PATH:
            try:
                importlib.import_module(name)
            except Exception as exc:  # noqa: BLE001
                broken.append(f"{name} ({_first_line(exc)})")
        if broken:
            problems.append("cannot import " + ", ".join(broken))
    loaded = sorted(m for m in FRAMEWORKS if m in sys.modules)
    if loaded:
        problems.append("the engine path imported " + ", ".join(loaded))
    device = None
    if "torch" in sys.modules:
        import torch

        info.update(torch=torch.__version__, cuda_build=torch.version.cuda)
        if device_arg == "cuda" and not torch.cuda.is_available():
            problems.append(f"no CUDA device visible to torch {torch.__version__}")
        else:
            device = torch.device(device_arg)
        if device is not None and device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            info.update(
                gpu=props.name,
                gpu_memory_gib=props.total_memory / 2**30,
                compute_capability=f"{props.major}.{props.minor}",
                multiprocessors=props.multi_processor_count,
                driver=_driver(),
                cudnn=torch.backends.cudnn.version(),
            )
            if importlib.util.find_spec("triton") is None:  # inductor's GPU code generator
                problems.append("no triton: the throughput_compile step will fail")
    fashion_ok = False
    if fashion and not missing and not broken:
        from searchkd.data import dataset_names, load_dataset

        if fashion_dir is not None and fashion_dir.is_dir():
            from searchkd.data import fashion as fashion_data  # the data set's own override

            os.environ[fashion_data.DEBIAN_ENV] = str(fashion_dir.absolute())
            info["fashion_mnist_files"] = str(fashion_dir)
        if "fashion_mnist" not in dataset_names():
            problems.append("searchkd has no fashion_mnist dataset (fashion_mnist step skipped)")
        else:
            try:
                ds = load_dataset("fashion_mnist", root=str(data_root))
                fashion_ok = True
                info["fashion_mnist"] = f"{len(ds.train_y)} train, {len(ds.test_y)} test images"
            except Exception as exc:  # noqa: BLE001 - DatasetNotFound, or a damaged file
                problems.append(f"fashion_mnist step skipped: {_first_line(exc)}")
    fatal = bool(missing or broken or loaded or device is None)
    return {
        "device": str(device) if device is not None else None,
        "info": info,
        "problems": problems,
        "fatal": fatal,
        "fashion_mnist": fashion_ok,
    }


def preflight_line(pre: dict[str, Any]) -> str:
    info = pre["info"]
    where = info.get("gpu") or pre["device"] or "no device"
    if info.get("driver"):
        where += f", driver {info['driver']}"
    versions = f"torch {info.get('torch')}, CUDA {info.get('cuda_build')}, Python {info['python']}"
    if pre["problems"]:
        verdict = "cannot run: " if pre["fatal"] else "runs, but: "
        return f"preflight: {verdict}{'; '.join(pre['problems'])} ({where}; {versions})"
    return f"preflight: ok ({where}; {versions}; {info.get('fashion_mnist', 'no fashion_mnist')})"


# ------------------------------------------------------------------ the steps (child side)

Emit = Callable[[str, Any], None]


def _bench_argv(opts: dict[str, Any], name: str) -> list[str]:
    table = SMALL if opts["small"] else GPU
    return ["--device", opts["device"], *table[name]]


def step_throughput(opts: dict[str, Any], emit: Emit, name: str = "throughput") -> None:
    import throughput

    args = throughput.parse_args(_bench_argv(opts, name))
    throughput.run(args, report=lambda r: emit(r["objective"], r))


def step_concurrency(opts: dict[str, Any], emit: Emit) -> None:
    import concurrency

    args = concurrency.parse_args(_bench_argv(opts, "concurrency"))
    concurrency.run(args, report=lambda row: emit(f"trials={row['procs']}", row))


def step_packing(opts: dict[str, Any], emit: Emit) -> None:
    import packing

    args = packing.parse_args(_bench_argv(opts, "packing"))
    packing.run(args, report=lambda config: emit(config["config"], config))


def fashion_space(settings: dict[str, Any], precision: str, root: str) -> dict[str, Any]:
    """One Fashion-MNIST training: the benchmarks' recipe (SGD, lr, momentum, weight decay),
    cosine over the epochs, cross-entropy only."""
    from _common import LR, MOMENTUM, WEIGHT_DECAY

    return {
        "name": f"gpu-fashion-{precision}",
        "objective": "ce",
        "data": {
            "dataset": "fashion_mnist",
            "root": root,
            "val_fraction": settings["val_fraction"],
            "options": settings["options"],
        },
        # ce trains the student alone: the engine loads no teacher for it, the spec names one.
        "teacher": {"arch": settings["student"]["arch"], "checkpoint": "none (ce)"},
        "student": settings["student"],
        "train": {
            "epochs": settings["epochs"],
            "batch_size": settings["batch_size"],
            "lr": LR,
            "momentum": MOMENTUM,
            "weight_decay": WEIGHT_DECAY,
            "lr_schedule": "cosine",
            "precision": precision,
        },
    }


def accuracy_verdict(runs: list[dict[str, Any]], test_images: int) -> dict[str, Any]:
    """Is bf16's last-epoch test accuracy that of fp32 within noise?

    Noise per precision: the seeds' sample variance, at least the binomial variance of one
    accuracy measured on `test_images` images (what a single seed has). Within noise: the
    difference of the means is at most two standard errors of that difference."""
    by: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for r in runs:
        by[r["precision"]].append(r["test_acc_last"])
    if not by["fp32"] or not by["bf16"]:
        return {"within_noise": None, "why": "a precision has no finished run"}
    out: dict[str, Any] = {"test_images": test_images}
    se2 = 0.0
    for precision, accs in by.items():
        mean = sum(accs) / len(accs)
        binomial = mean * (1 - mean) / test_images
        sample = sum((a - mean) ** 2 for a in accs) / (len(accs) - 1) if len(accs) > 1 else 0.0
        var = max(sample, binomial)
        se2 += var / len(accs)
        out[precision] = {"mean": mean, "seeds": len(accs), "std": math.sqrt(var)}
    diff = out["bf16"]["mean"] - out["fp32"]["mean"]
    out.update(
        difference=diff,
        se_difference=math.sqrt(se2),
        within_noise=abs(diff) <= 2 * math.sqrt(se2),
    )
    return out


def step_fashion_mnist(opts: dict[str, Any], emit: Emit) -> None:
    import torch

    from searchkd.engine import Engine
    from searchkd.spec import Spec

    settings = FASHION_SMALL if opts["small"] else FASHION
    device = torch.device(opts["device"])
    if opts["small"]:
        torch.set_num_threads(1)
    runs = []
    test_images = 0
    for seed in settings["seeds"]:
        for precision in ("fp32", "bf16"):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            spec = Spec.model_validate(fashion_space(settings, precision, opts["data_root"]))
            engine = Engine(spec, seed=seed, device=device)
            start = time.perf_counter()
            rows = [engine.run_epoch() for _ in range(settings["epochs"])]
            last = rows[-1]
            test_images = engine.loaders.test.num_samples
            run = {
                "precision": precision,
                "seed": seed,
                "bf16_autocast": engine.cohort.bf16,
                "tf32": bool(device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32),
                "channels_last": device.type == "cuda",
                "student": settings["student"],
                "epochs": settings["epochs"],
                "train_images": engine.loaders.num_train,
                "test_images": test_images,
                "test_acc_last": last["test_acc_last"],
                "best_val_acc": last["best_val_acc"],
                "test_acc": last["test_acc"],
                "train_img_s": [r["images_per_second"] for r in rows],
                "seconds": time.perf_counter() - start,
            }
            if device.type == "cuda":
                run["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            runs.append(run)
            say(
                f"  fashion_mnist {precision} seed {seed}: test_acc_last "
                f"{run['test_acc_last']:.4f} after {settings['epochs']} epochs, "
                f"{run['seconds']:.1f}s"
            )
            emit(f"{precision} seed {seed}", run)
            del engine
            if device.type == "cuda":
                torch.cuda.empty_cache()
            emit("verdict", accuracy_verdict(runs, test_images))


STEP_FUNCTIONS: dict[str, Callable[..., None]] = {
    "throughput": step_throughput,
    "throughput_compile": lambda o, e: step_throughput(o, e, "throughput_compile"),
    "throughput_b256": lambda o, e: step_throughput(o, e, "throughput_b256"),
    "concurrency": step_concurrency,
    "packing": step_packing,
    "fashion_mnist": step_fashion_mnist,
}


def _child(name: str, opts: dict[str, Any], conn: Any) -> None:
    """One step in a process group of its own, so that its time box kills its children too.
    Figures go through a pipe, written at once: a step that dies has sent all it measured."""
    os.setsid()
    # A forkserver child inherits forkserver as its default start method; the benchmarks'
    # own processes (the classic loop's DataLoader workers) start as they would elsewhere.
    multiprocessing.set_start_method(opts["start_method"], force=True)

    def emit(key: str, value: Any) -> None:
        conn.send(("figure", key, json.loads(json.dumps(value, default=str))))

    try:
        STEP_FUNCTIONS[name](opts, emit)
    except BaseException as exc:  # noqa: BLE001 - reported, then the next step runs
        tail = traceback.format_exc().strip().splitlines()[-6:]
        conn.send(("error", None, {"error": _first_line(exc), "traceback": tail}))
        return
    conn.send(("done", None, None))


# ------------------------------------------------------------------ the run (parent side)


def write_atomically(path: Path, payload: dict[str, Any]) -> None:
    """Replace the JSON file whole: a run killed while writing leaves the previous version."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def run_step(
    ctx: Any,
    name: str,
    opts: dict[str, Any],
    limit_s: float,
    record: dict[str, Any],
    save: Callable[[], None],
) -> None:
    """Run step `name` in a child process for at most `limit_s` seconds, recording each figure
    into `record["figures"]` (and saving) as it arrives."""
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(name, opts, writer), name=f"gpu-{name}")
    start = time.monotonic()
    proc.start()
    writer.close()  # the child's end: once the child is gone, reading ends
    record.update(status="running", limit_s=round(limit_s, 1), figures={})
    save()
    while record["status"] == "running":
        left = limit_s - (time.monotonic() - start)
        if left <= 0:
            record.update(status="timed out", error=f"killed at its time box, {limit_s:.0f} s")
            break
        message = None
        if reader.poll(min(left, 1.0)):
            with contextlib.suppress(EOFError, OSError):
                message = reader.recv()
        elif proc.is_alive():
            continue
        if message is None:  # ended without a word: a crash, an out-of-memory kill
            proc.join(timeout=10)
            record.update(status="failed", error=f"its process ended with {proc.exitcode}")
            break
        kind, key, value = message
        if kind == "figure":
            record["figures"][key] = value
            save()
        elif kind == "error":
            record.update(status="failed", **value)
        else:
            record["status"] = "done"
    _kill_group(proc.pid)  # what it started and left behind (a killed step: all of it)
    proc.join(timeout=30)
    record["seconds"] = round(time.monotonic() - start, 1)
    save()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    if args.fetch_wheels:
        cmd = fetch_command(Path(args.fetch_wheels))
        say("$ " + shlex.join(cmd))
        return subprocess.run(cmd, check=False).returncode
    out = Path(args.json)
    if args.wheels:
        target = Path(tempfile.mkdtemp(prefix="searchkd-gpu-site-"))
        say(install_wheels(Path(args.wheels), target))
    device = args.device or "cuda"
    steps = [s for s in STEPS if not args.only or s.name in args.only]
    data_root = Path(args.data_root or tempfile.mkdtemp(prefix="searchkd-gpu-data-"))
    try:
        return _run(args, out, device, steps, data_root, started)
    finally:
        if not args.data_root:  # the unpacked data set: this run's own folder
            shutil.rmtree(data_root, ignore_errors=True)


def _run(
    args: argparse.Namespace,
    out: Path,
    device: str,
    steps: list[Step],
    data_root: Path,
    started: float,
) -> int:
    wanted = any(s.needs_fashion for s in steps)
    pre = preflight(device, data_root, wanted, Path(args.fashion_dir))
    say(preflight_line(pre))
    payload: dict[str, Any] = {
        "device": pre["info"].get("gpu") or pre["device"],
        "small": args.small,
        "preflight": pre,
        "steps": {},
    }
    if not pre["fatal"]:
        import torch
        from _common import environment

        env = environment(torch.device(device))
        payload["device"] = env["device"]
        payload["environment"] = {**env, **pre["info"]}
    else:
        payload["environment"] = {
            **pre["info"],
            "command": shlex.join(["python", *sys.argv]),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        }
    write_atomically(out, payload)
    if pre["fatal"]:
        return 2
    opts = {
        "device": device,
        "small": args.small,
        "data_root": str(data_root),
        "start_method": multiprocessing.get_context().get_start_method(),
    }
    ctx = multiprocessing.get_context("forkserver")
    # Each step's process forks from a server that has imported torch and the benchmarks once
    # (and never touched CUDA), instead of importing them afresh.
    ctx.set_forkserver_preload(["torch", *ENGINE_PATH])
    limits = [SMALL_LIMIT_S if args.small else s.limit_s * args.scale for s in steps]
    if args.small:
        deadline = time.monotonic() + sum(limits)
    else:
        deadline = started + max(BUDGET_S * args.scale, time.monotonic() - started + sum(limits))
    for i, step in enumerate(steps):
        record: dict[str, Any] = {}
        payload["steps"][step.name] = record
        if step.needs_fashion and not pre["fashion_mnist"]:
            record.update(status="skipped", error="no fashion_mnist data (see the preflight)")
            write_atomically(out, payload)
            continue
        # Its own box plus what the steps before it left unused, never the later steps' time.
        limit = deadline - time.monotonic() - sum(limits[i + 1 :])
        say(f"step {step.name}: up to {limit:.0f} s")
        run_step(ctx, step.name, opts, limit, record, lambda: write_atomically(out, payload))
        say(f"step {step.name}: {record['status']} in {record['seconds']:.0f} s")
    done = sum(r.get("status") == "done" for r in payload["steps"].values())
    say(f"gpu.py: {done} of {len(steps)} steps done; figures in {out}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda")
    p.add_argument("--small", action="store_true", help="the dry run: every step at its smallest")
    p.add_argument("--json", help="the figures, rewritten as each one is measured")
    p.add_argument("--wheels", help="install these wheels (offline) into a folder of this run's")
    p.add_argument(
        "--fetch-wheels",
        metavar="DIR",
        help=f"fetch the carried wheels for Python {DEVICE_PYTHON} into DIR (here, not there)",
    )
    p.add_argument(
        "--fashion-dir",
        default=str(FASHION_DIR),
        help="the gzip'd Fashion-MNIST files (default: the working tree's .data/fashion-mnist/ "
        "when there, else the data set's own search: the Debian package's folder)",
    )
    p.add_argument(
        "--data-root",
        help="data.root of the Fashion-MNIST step, where it is unpacked (default: a new "
        "temporary folder)",
    )
    p.add_argument(
        "--only",
        type=lambda text: [n.strip() for n in text.split(",") if n.strip()],
        help=f"comma-separated steps of: {', '.join(s.name for s in STEPS)}",
    )
    p.add_argument("--scale", type=float, default=1.0, help="multiply every GPU time box by this")
    args = p.parse_args(argv)
    if not args.fetch_wheels and not args.json:
        p.error("--json is required")
    unknown = [n for n in args.only or [] if n not in STEP_FUNCTIONS]
    if unknown:
        p.error(f"--only: unknown step {unknown[0]}; known: {', '.join(STEP_FUNCTIONS)}")
    return args


if __name__ == "__main__":
    raise SystemExit(main())
