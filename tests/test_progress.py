"""Progress bars in a log file: a few lines, not one per redraw (stages/common/progress.py)."""

from __future__ import annotations

import subprocess
import sys

from helpers import subprocess_env

LOOP = (
    "import time\nfrom {module} import tqdm\nfor _ in tqdm(range(150), desc='work'):\n    time.sleep(0.01)\n"
)


def _redraws(module: str) -> int:
    """How many times a 1.5 s loop's bar is drawn when stderr is a pipe (as in a batch log)."""
    proc = subprocess.run([sys.executable, "-c", LOOP.format(module=module)], capture_output=True,
                          text=True, env=subprocess_env(), timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stderr.count("work:")


def test_without_a_tty_the_bar_is_drawn_at_start_and_end_only() -> None:
    assert _redraws("tqdm.auto") >= 5  # the flood: a redraw every 0.1 s
    assert _redraws("stages.common.progress") <= 2
