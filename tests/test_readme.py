"""The README's quickstart sample is what the quickstart prints (`tests/readme_sample.py`
regenerates it: `python tests/readme_sample.py`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import readme_sample as sample  # noqa: E402

OUTPUT = [
    "training teacher resnet20 (30 epochs, once; cached in trials/teachers/548a580567b05c1f)",
    *(f"  teacher epoch {e}/30: train_loss 0.1000, val_acc 0.9{e:03d}" for e in range(1, 31)),
    "teacher resnet20: test_acc 0.9972 (val 0.9954)",
    "search quickstart: 8 trials of 12 epochs (new), in trials/quickstart",
    "[     5s] trial 0 epoch 1/12       | 0/8 done, 2 running | best trial 0: best_val_acc 0.3843",
    *(
        f"[    {9 + n}s] trial {n} finished at epoch 12: val_acc 0.98{n}0, best_val_acc 0.99{n}0"
        f" | {n}/8 done, 2 running | best trial {n}: best_val_acc 0.99{n}0"
        for n in range(8)
    ),
    "",
    "best trial 7: best_val_acc 0.9970, test_acc 0.9916",
    "report: trials/quickstart/report/index.html  (4 plots, 2.1s)",
    "  logged to MLflow: artifacts report/ of the search's run 0123456789abcdef0123456789abcdef",
]


def test_the_sample_is_the_output_abridged_and_checked_line_by_line() -> None:
    """Abridged: 3 teacher epochs and 4 ended trials of the output, `...` between; a sample is
    true when every line was printed, timings, run ids and a progress line's right-hand part
    (the order two concurrent trials reach the driver in) set aside."""
    abridged = sample.abridge(OUTPUT)
    assert [line for line in abridged if "teacher epoch" in line] == [
        OUTPUT[1],
        OUTPUT[2],
        OUTPUT[30],
    ]
    assert abridged[3] == "  ..." and abridged.count(sample.ELLIPSIS) == 2  # heartbeats, trials
    ended = [line.split("] ")[1].split(" |")[0] for line in abridged if line.startswith("[")]
    assert [e.split(" finished")[0] for e in ended] == ["trial 0", "trial 1", "trial 2", "trial 7"]
    assert abridged[-1].endswith("run <parent run id>")
    assert sample.matches(abridged, OUTPUT) == []
    later = [
        line.replace("2.1s", "3.4s").replace("[    9s]", "[   12s]").replace("| 0/8", "| 1/8")
        for line in OUTPUT
    ]
    assert sample.matches(abridged, later) == []  # another run of the same search
    stale = [*abridged[:-4], "best trial 3: val_acc 1.0000, test_acc 0.9916", *abridged[-3:]]
    assert sample.matches(stale, OUTPUT) == ["best trial 3: val_acc 1.0000, test_acc 0.9916"]


def test_the_readme_holds_one_sample_block() -> None:
    lines = sample.block(sample.README.read_text())
    assert lines[0].startswith("training teacher resnet20")


@pytest.mark.integration
def test_the_readme_quickstart_sample_is_what_the_quickstart_prints(tmp_path: Path) -> None:
    """The whole quickstart, as a user in a fresh clone runs it (a minute on an idle 2-core
    machine). If it fails after a change to how the search decides, regenerate the sample:
    `python tests/readme_sample.py`."""
    output = sample.run_quickstart(tmp_path)
    assert sample.matches(sample.block(sample.README.read_text()), output) == []
