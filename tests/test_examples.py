"""The example scripts in `examples/`, each run as its own program."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, cwd: Path) -> str:
    """Runs `examples/<name>` in a fresh interpreter and returns its stdout.

    A fresh process matters: the scripts split the CPU into logical devices,
    which TensorFlow allows only before it starts.
    """
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def value(stdout: str, prefix: str) -> str:
    """The rest of the one printed line that starts with `prefix`."""
    found = [line[len(prefix) :] for line in stdout.splitlines() if line.startswith(prefix)]
    assert len(found) == 1, f"expected one line starting {prefix!r} in:\n{stdout}"
    return found[0].strip()


def test_keras_layers_on_tf_tensors(tmp_path):
    out = run_example("keras_layers_on_tf_tensors.py", tmp_path)
    assert float(value(out, "test accuracy:")) >= 0.9
    assert value(out, "dropout differs between training=True and training=False:") == "True"
    bn = value(out, "batchnorm training=False matches the moving-statistics formula:")
    assert bn.startswith("True")
    assert float(bn.split("max diff ")[1].rstrip(")")) <= 1e-5


def test_scopes_and_sharing(tmp_path):
    out = run_example("scopes_and_sharing.py", tmp_path)
    ops = [line.split() for line in out.splitlines() if line.startswith("op ")]
    assert [words[1].split("/")[0] for words in ops] == ["branch_a", "branch_b", "merge"]
    assert ops[0][3] != ops[1][3]  # The two branches went to different devices.
    assert value(out, "both branches read the same 2 variables:") == "True"
    assert int(value(out, "variables captured by the graph:")) == 4
    assert value(out, "updated by batchnorm:") == (
        "mlp/batch_normalization/moving_mean, mlp/batch_normalization/moving_variance"
    )
    assert len(value(out, "trainable:").split(", ")) == 6
    first, last = (float(v) for v in value(out, "loss:").split(" -> "))
    assert last < 0.5 * first
    assert value(out, "moving mean updated by the train step:") == "True"


def test_model_on_tensors(tmp_path):
    out = run_example("model_on_tensors.py", tmp_path)
    assert value(out, "model(tensor) returns a tf.Tensor:") == "True, shape (359, 10)"
    assert float(value(out, "test accuracy:")) >= 0.9
    assert value(out, "fresh model input shape:") == "(359, 64)"
    assert value(out, "identical predictions after load_weights:") == "True"
    assert list(tmp_path.iterdir()) == []  # The weights file went to a temporary directory.


def test_model_parallelism(tmp_path):
    out = run_example("model_parallelism.py", tmp_path)
    variables = [line.split() for line in out.splitlines() if line.startswith("variable ")]
    devices = {words[1].split("/")[1]: words[3] for words in variables}
    assert len(variables) == 6 and set(devices) == {"left", "right", "head"}
    assert devices["left"] != devices["right"]
    ops = [line.split() for line in out.splitlines() if line.startswith("op ")]
    assert len(ops) == 3 and ops[0][3] != ops[1][3]
    assert float(value(out, "test accuracy:")) >= 0.9


def test_replicas_shared_weights(tmp_path):
    out = run_example("replicas_shared_weights.py", tmp_path)
    assert value(out, "tower outputs:").startswith("[(51, 10), (50, 10)] on ")
    assert float(value(out, "builder.call(x) vs model(x): max abs diff")) <= 1e-6
    assert float(value(out, "average of 2 replicas vs model(x): max abs diff")) <= 1e-6
    assert len(value(out, "replica matmuls placed on:").split(", ")) == 2
    assert float(value(out, "test accuracy:")) >= 0.9
    assert int(value(out, "weights in the model:")) == 4


def test_train_digits_on_one_machine(tmp_path):
    out = run_example("train_digits.py", tmp_path)
    assert value(out, "processes:") == "1, towers per process: 2"
    assert float(value(out, "test accuracy:")) >= 0.95
    assert (tmp_path / "digits_convnet.keras").is_file()


def test_train_digits_across_processes_with_horovodrun(tmp_path):
    horovodrun = Path(sys.executable).with_name("horovodrun")
    if not horovodrun.exists():
        pytest.skip(f"Horovod is not installed beside {sys.executable}; `make horovod`")
    result = subprocess.run(
        [
            horovodrun,
            "-np",
            "2",
            "-H",
            "localhost:2",
            "--gloo",
            sys.executable,
            EXAMPLES / "train_digits.py",
            "--backend",
            "horovod",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    chief = "\n".join(
        line.split("]<stdout>:", 1)[1]
        for line in result.stdout.splitlines()
        if line.startswith("[0]<stdout>:")
    )
    assert value(chief, "processes:") == "2, towers per process: 2"
    assert float(value(chief, "test accuracy:")) >= 0.95
    assert "[1]<stdout>:test accuracy" not in result.stdout
    assert (tmp_path / "digits_convnet.keras").is_file()


def test_train_digits_across_processes_with_replicate_launch(tmp_path):
    result = subprocess.run(
        [
            Path(sys.executable).with_name("replicate"),
            "launch",
            "--nproc",
            "2",
            "--",
            sys.executable,
            EXAMPLES / "train_digits.py",
            "--backend",
            "collective",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    chief = "\n".join(line[4:] for line in result.stdout.splitlines() if line.startswith("[0] "))
    assert value(chief, "processes:") == "2, towers per process: 2"
    assert float(value(chief, "test accuracy:")) >= 0.95
    assert "[1] test accuracy" not in result.stdout
    assert (tmp_path / "digits_convnet.keras").is_file()


def test_export_for_serving(tmp_path):
    out = run_example("export_for_serving.py", tmp_path)
    assert value(out, "exported version:").endswith(os.path.join("serving", "digits", "1"))
    assert value(out, "signatures:") == "['classify', 'serving_default']"
    assert float(value(out, "max |served - predict|:")) <= 1e-5
    assert float(value(out, "served test accuracy:")) >= 0.9


def test_gan_with_its_own_train_step(tmp_path):
    out = run_example("gan_digits.py", tmp_path)
    assert value(out, "towers:").startswith("2 on")
    # One discriminator update per batch (23 batches x 5 epochs), not per tower.
    assert value(out, "discriminator steps:") == "115"
    assert float(value(out, "generator moved:")) > 1e-3
    for name in ("final d_loss:", "final g_loss:"):
        assert 0.0 < float(value(out, name)) < 5.0
    low, high = map(float, value(out, "sample range:").split())
    assert -1.0 <= low < high <= 1.0
