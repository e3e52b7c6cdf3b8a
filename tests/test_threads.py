"""Processes that share a host share its cores: each TensorFlow runtime gets its part."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from replicate import threads

BIN = Path(sys.executable).parent


def test_the_share_of_each_process(monkeypatch):
    monkeypatch.delenv(threads.ENVIRONMENT, raising=False)
    for name in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
        monkeypatch.delenv(name, raising=False)
    cores = threads.cores()
    assert threads.share(1) is None  # one process keeps TensorFlow's sizes
    assert threads.share(2) == max(1, cores // 2)
    assert threads.share(4 * cores) == 1
    assert threads.share(2, 3) == 3
    assert threads.share(2, "tensorflow") is None
    monkeypatch.setenv(threads.ENVIRONMENT, "5")
    assert threads.share(2) == 5
    monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", "7")  # TensorFlow's own variables win
    assert threads.share(2) is None


@pytest.mark.parametrize("bad", [0, -1, "many", 2.5, True])
def test_a_bad_setting_is_named(bad):
    with pytest.raises(
        ValueError, match=r"`threads` must be a positive number.*Received: threads="
    ):
        threads.share(2, bad)


def _run(code, **env):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TF_NUM_")}
    environ.pop(threads.ENVIRONMENT, None)
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_the_pools_are_sized_before_tensorflow_starts():
    code = (
        "import json, tensorflow as tf\n"
        "from replicate import threads\n"
        "got = threads.apply(4, 'auto')\n"
        "tf.constant(1.0) + 1.0\n"
        "c = tf.config.threading\n"
        "print(json.dumps([got, c.get_intra_op_parallelism_threads(), "
        "c.get_inter_op_parallelism_threads()]))\n"
    )
    got, intra, inter = json.loads(_run(code).stdout.strip().splitlines()[-1])
    expected = max(1, threads.cores() // 4)
    assert got == intra == inter == expected


def test_too_late_is_a_warning_that_says_what_to_do():
    code = (
        "import tensorflow as tf\n"
        "from replicate import threads\n"
        "tf.constant(1.0) + 1.0\n"
        "print(threads.apply(4, 'auto'))\n"
    )
    result = _run(code)
    assert result.stdout.strip().splitlines()[-1] == "None"
    assert "this process is one of 4 on its host, but TensorFlow had already started" in (
        result.stderr
    )
    assert "REPLICATE_THREADS=tensorflow silences this" in result.stderr


def test_replicate_launch_gives_each_process_its_share():
    code = (
        "import os, json; print(json.dumps({k: os.environ.get(k) for k in "
        "('TF_NUM_INTRAOP_THREADS', 'TF_NUM_INTEROP_THREADS', 'OMP_NUM_THREADS')}))"
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TF_NUM_")}
    for name in ("OMP_NUM_THREADS", threads.ENVIRONMENT):
        environ.pop(name, None)
    result = subprocess.run(
        [str(BIN / "replicate"), "launch", "--nproc", "2", "--", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=environ,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    share = str(max(1, threads.cores() // 2))
    lines = [line.split("] ", 1)[1] for line in result.stdout.splitlines() if "{" in line]
    assert [json.loads(line) for line in lines] == [
        {"TF_NUM_INTRAOP_THREADS": share, "TF_NUM_INTEROP_THREADS": share, "OMP_NUM_THREADS": share}
    ] * 2
