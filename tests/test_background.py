"""background.Job with input fed after it starts: the send never waits for the job, a job that ends without
reading is no hang, and its errors reach the parent; background.Prefetch runs in its caller's context."""

from __future__ import annotations

import time

import numpy as np
import pytest

from lipsync_cli.background import Job


def _scaled(k: float, receive) -> np.ndarray:
    time.sleep(1.0)  # busy with something else (learning a voice) before it reads its input
    return receive() * k


def _refuses(receive) -> None:
    raise ValueError("no usable speech")


def test_fed_job_gets_its_input_and_send_does_not_wait():
    x = np.arange(2_000_000, dtype=np.float32)  # 8 MB: far more than a pipe holds
    with Job(_scaled, 3.0, feed=True) as job:
        t = time.perf_counter()
        job.send(x)
        assert time.perf_counter() - t < 0.5  # the job sleeps 1 s before reading: the send went to a thread
        np.testing.assert_array_equal(job.result(), x * 3)


def test_fed_job_that_ends_without_reading():
    with Job(_refuses, feed=True) as job:
        job.send(np.zeros(2_000_000, np.float32))
        with pytest.raises(ValueError, match="no usable speech"):
            job.result()
    # leaving the block joined the pending send (broken pipe), with nothing left running
    assert not any(t.is_alive() for t in job._senders)


def test_a_script_without_a_main_guard_runs_its_job_once(tmp_path):
    """spawn would re-run the parent's script in the child: `lipsync.dub(...)` at a script's top level dubbed twice
    and the child died ('background job died'). The job runs once and the script's top level runs once."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "s.py"
    top_level = "import math\nfrom lipsync_cli.background import Job\n"
    script.write_text(top_level + "print('top', Job(math.sqrt, 9.0).result())\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "top 3.0\n"


def test_prefetch_runs_in_the_callers_context():
    """--quiet is a context variable: the decoder thread sees it (an MPEG-TS decode's note printed under -q)."""
    from lipsync_cli import progress
    from lipsync_cli.background import Prefetch

    progress.set_quiet(True)
    try:
        assert list(Prefetch(lambda: (progress.is_quiet() for _ in range(3)))) == [True] * 3
    finally:
        progress.set_quiet(False)
