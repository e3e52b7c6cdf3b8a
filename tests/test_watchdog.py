"""The hang watchdog: known writes and the waits for them never count; its default limit.

Each case runs in a fresh Python process (the watchdog ends a hung process with
os._exit), as rank 0 of 2 with a 1-second limit."""

import subprocess
import sys
import textwrap
import time

import pytest

from replicate.backends import LocalBackend
from replicate.watchdog import DEFAULT_HANG_TIMEOUT, HUNG_EXIT_CODE

CASES = {
    # 3.5 s of own work: more than the 1 s limit.
    "own work": ("time.sleep(3.5)", HUNG_EXIT_CODE),
    # 3.5 s writing a file replicate knows of: never counted.
    "writing": ("with dog.writing():\n    time.sleep(3.5)", 0),
    # 3.5 s at a collective: more than 3 x the limit.
    "waiting": ("with dog.waiting():\n    time.sleep(3.5)", HUNG_EXIT_CODE),
    # The same wait, announced as a wait for the chief's write: never counted.
    "waiting for a writer": (
        "dog.expect_writer()\nwith dog.waiting():\n    time.sleep(3.5)",
        0,
    ),
    # The announcement covers one wait only; the next counts again.
    "the next wait counts": (
        "dog.expect_writer()\nwith dog.waiting():\n    pass\n"
        "with dog.waiting():\n    time.sleep(3.5)",
        HUNG_EXIT_CODE,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_what_counts_against_the_limit(case):
    body, expected = CASES[case]
    script = textwrap.dedent(
        """
        import time
        from replicate.watchdog import Watchdog
        dog = Watchdog(0, 2, limit=1.0)
        with dog.watching():
        """
    ) + textwrap.indent(body, "    ")
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == expected, result.stderr[-2000:]
    if expected:
        assert "replicate: process 0 of 2" in result.stderr
        assert time.monotonic() - start < 30


def test_the_default_limit_is_thirty_minutes(monkeypatch):
    monkeypatch.delenv("REPLICATE_HANG_TIMEOUT", raising=False)
    assert DEFAULT_HANG_TIMEOUT == 1800.0 == LocalBackend().hang_timeout
    monkeypatch.setenv("REPLICATE_HANG_TIMEOUT", "15")
    assert LocalBackend().hang_timeout == 15.0
    with pytest.raises(ValueError, match=r"Received: hang_timeout=-1"):
        LocalBackend(hang_timeout=-1)
