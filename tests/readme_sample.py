"""The README's quickstart sample, from a real run of the quickstart: regenerate it, or check it.

    python tests/readme_sample.py            # run the quickstart, rewrite the README's block
    python tests/readme_sample.py --check    # run it, say whether the README's block holds

The quickstart runs in a fresh working directory (a copy of `spaces/`, a new `./trials`), so
its paths are the ones a user in a fresh clone sees. The sample is the run's output abridged:
the teacher's first two and last epoch lines, the first three trials that ended and the last
(`...` between), then the whole summary. `matches` is what the integration test asserts: every
line of the README's block is in the run's output once timings, the run id and a progress line's
right-hand part (how many trials were running and the best so far, which depend on the order
in which two concurrent trials reach the driver) are set aside.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BEGIN = "<!-- quickstart-sample: python tests/readme_sample.py -->"
END = "<!-- /quickstart-sample -->"
ELLIPSIS = "..."
PROGRESS = re.compile(r"^\[\s*\d+s\] (?P<text>.*?)\s*\| ")
ENDED = re.compile(r"^trial \d+ (finished|stopped by ASHA|FAILED)")
RUN_ID = re.compile(r"\b[0-9a-f]{32}\b")
SECONDS = re.compile(r"\b\d+(\.\d+)?s\b")


def run_quickstart(workdir: Path) -> list[str]:
    """`searchkd tune spaces/quickstart.yaml` in `workdir`, as a user runs it: its stdout lines."""
    shutil.copytree(REPO / "spaces", workdir / "spaces")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("SEARCHKD_TRIALS_DIR", None)
    # torch's own thread count, as a user's shell has it (the tests' conftest sets 1, and CPU
    # results depend on it): the sample is a 2-core machine's, CI's and the developers' size
    env.pop("OMP_NUM_THREADS", None)
    done = subprocess.run(
        [sys.executable, "-m", "searchkd.cli", "tune", "spaces/quickstart.yaml"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the quickstart exited {done.returncode}:\n{done.stderr[-2000:]}")
    return done.stdout.splitlines()


def abridge(lines: list[str]) -> list[str]:
    """The sample: the output with most teacher epochs and most ended trials left out."""
    epochs = [i for i, line in enumerate(lines) if line.startswith("  teacher epoch ")]
    progress = [i for i, line in enumerate(lines) if PROGRESS.match(line)]
    ended = [i for i in progress if ENDED.match(PROGRESS.match(lines[i])["text"])]
    keep = set(range(len(lines))) - set(epochs) - set(progress)
    keep |= set(epochs[:2] + epochs[-1:]) | set(ended[:3] + ended[-1:])
    out: list[str] = []
    for i in sorted(keep):
        if out and i - 1 not in keep and (i - 1 in epochs or i - 1 in progress):
            out.append("  ..." if i - 1 in epochs else ELLIPSIS)
        out.append(RUN_ID.sub("<parent run id>", lines[i]))
    return out


def normalised(line: str) -> str:
    """A line with what differs between two runs of the same search set aside."""
    m = PROGRESS.match(line)
    if m:
        return m["text"]
    return SECONDS.sub("Ns", RUN_ID.sub("<parent run id>", line))


def block(readme: str) -> list[str]:
    """The README's sample: the lines of the fenced block between the markers."""
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    inner = readme[start:end].strip().splitlines()
    assert inner[0].startswith("```") and inner[-1] == "```", "the sample is one fenced block"
    return inner[1:-1]


def matches(sample: list[str], output: list[str]) -> list[str]:
    """The sample's lines the run did not print (empty: the README is true)."""
    printed = {normalised(line) for line in output}
    return [line for line in sample if line.strip() != ELLIPSIS and normalised(line) not in printed]


def write(sample: list[str]) -> None:
    text = README.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    README.write_text(text[:start] + "\n```\n" + "\n".join(sample) + "\n```\n" + text[end:])


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        output = run_quickstart(Path(tmp))
    if "--check" in sys.argv:
        missing = matches(block(README.read_text()), output)
        for line in missing:
            print(f"not printed: {line}")
        return 1 if missing else 0
    write(abridge(output))
    print(f"{README.relative_to(REPO)}: the quickstart sample is rewritten from this run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
