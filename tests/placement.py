"""Where TensorFlow really runs each op of a step: its placer's log, read in a fresh process."""

import os
import re
import subprocess
import sys
import textwrap

_PLACED = re.compile(r"^(\S+): \((\w+)\): /job:localhost/replica:0/task:0/device:(\w+:\d+)$")


def placed_ops(body: str, devices: int = 3) -> dict[str, tuple[str, str]]:
    """Runs `body` (which builds and calls a `tf.function` named by the caller) in a fresh
    process with placement logging on; returns `{op name: (op type, device)}` as placed.

    `body` may use `replicate`, `keras`, `tf`, `np` and `devices` (simulated CPU devices).
    """
    script = textwrap.dedent(
        f"""
        import numpy as np, keras, tensorflow as tf, replicate
        devices = replicate.simulate_devices({devices})
        tf.debugging.set_log_device_placement(True)
        """
    ) + textwrap.dedent(body)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = {}
    for line in (result.stdout + result.stderr).splitlines():
        match = _PLACED.match(line.strip())
        if match:
            found[match.group(1)] = (match.group(2), match.group(3))
    return found
