"""A search whose disk fills up, at its start and in its middle, then resumed after freeing
space. Run as root inside a private mount namespace (`unshare --mount`), where a small tmpfs is
the trials directory (the rest of the machine never sees it):

    unshare --mount --propagation private python tests/disk_full.py SPACE TRIALS OUT

Writes OUT/report.json (each step's exit code and output) and copies the trials directory to
OUT/trials for the test to check.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    space, trials, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    trials.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(trials)], check=True)
    cmd = [
        sys.executable,
        "-m",
        "searchkd.cli",
        "tune",
        space,
        "--trials-dir",
        str(trials),
        "--num-cpus",
        "2",
    ]
    report: dict[str, dict] = {}

    def step(
        name: str, proc: subprocess.CompletedProcess | subprocess.Popen, stdout: str, stderr: str
    ) -> None:
        report[name] = {
            "rc": proc.returncode,
            "stdout": stdout,
            "stderr": stderr,
            "files": sorted(str(p.relative_to(trials)) for p in trials.rglob("*")),
        }

    # 1. Full from the start: the teacher's first epoch does not fit.
    done = subprocess.run(cmd, capture_output=True, text=True)
    step("start", done, done.stdout, done.stderr)

    # 2. Room to start; mid-search a file takes what is left.
    subprocess.run(["mount", "-o", "remount,size=96m", "tmpfs", str(trials)], check=True)
    proc = subprocess.Popen(
        [*cmd, "--resume"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    record = next(iter(trials.glob("*/results.jsonl")), None)
    while proc.poll() is None and (record is None or len(record.read_text().splitlines()) < 4):
        time.sleep(0.2)
        record = record or next(iter(trials.glob("*/results.jsonl")), None)
    filler = trials / "filler"
    try:
        with filler.open("wb") as f:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
    except OSError:
        pass
    stdout, stderr = proc.communicate(timeout=1200)
    step("middle", proc, stdout, stderr)

    # 3. Space freed: the same command with --resume ends the search.
    filler.unlink()
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True)
    step("resume", done, done.stdout, done.stderr)

    shutil.copytree(trials, out / "trials", ignore=shutil.ignore_patterns("*.lock"))
    (out / "report.json").write_text(json.dumps(report))
    os.sync()


if __name__ == "__main__":
    main()
