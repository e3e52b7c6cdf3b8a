"""The demo job end to end, as `replicate demo` runs it."""

import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest


@pytest.mark.slow
def test_demo_reaches_95_percent_and_saves_the_template(tmp_path):
    script = Path(sys.executable).with_name("replicate")
    output = tmp_path / "digits.keras"
    result = subprocess.run(
        [script, "demo", "--devices", "2", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("test accuracy: ")
    assert float(lines[-1].split(": ")[1]) >= 0.95
    assert any(line.startswith("examples per second: ") for line in lines)
    assert "global batch: 64, per-tower batch: 32" in result.stdout
    assert "towers: 2 on /cpu:0, /cpu:1" in result.stdout
    model = keras.models.load_model(output)
    assert model.name == "digits_convnet"
    assert model.predict(np.zeros((2, 8, 8, 1), "float32"), verbose=0).shape == (2, 10)
