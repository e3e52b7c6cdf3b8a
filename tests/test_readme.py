"""Every Python snippet of the README runs, in order, as a newcomer would paste them."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SKIP = re.compile(r"<!-- readme-test: skip \((?P<why>[^)]*)\) -->\s*$")

# What the README leaves to the reader: a model, data and a loss function.
PRELUDE = """
import os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras
import numpy as np
from replicate.demo import load_digits

(x, y), _ = load_digits()
x = x.reshape(len(x), 64)


def make_my_keras_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(32, activation="relu"),
         keras.layers.Dense(10, activation="softmax")]
    )


loss_fn = keras.losses.SparseCategoricalCrossentropy()
"""


def snippets():
    """(code, skip reason or None) for each ```python block, in order."""
    text = README.read_text()
    found = []
    for match in re.finditer(r"```python\n(.*?)```", text, re.S):
        before = text[: match.start()].rstrip("\n").splitlines()
        skip = SKIP.search(before[-1]) if before else None
        found.append((match.group(1), skip.group("why") if skip else None))
    return found


def test_the_readme_has_snippets_and_skips_name_their_tests():
    found = snippets()
    assert len(found) >= 5
    for _code, why in found:
        if why is not None:
            named = re.findall(r"(tests/\w+\.py|examples/\w+\.py)", why)
            assert named, why
            for path in named:
                assert (ROOT / path).is_file(), path


def test_every_snippet_runs(tmp_path):
    runnable = [code for code, why in snippets() if why is None]
    script = tmp_path / "readme_snippets.py"
    script.write_text(PRELUDE + "\n\n".join(f"# --- snippet\n{code}" for code in runnable))
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert (tmp_path / "model.keras").is_file()  # the quick start's save
    assert (tmp_path / "serving" / "digits" / "1" / "saved_model.pb").is_file()
