"""The Horovod backend under real `horovodrun`: 2 processes x 2 simulated towers."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

import replicate

pytestmark = pytest.mark.horovod

WORKER = Path(__file__).with_name("horovod_worker.py")
HOROVODRUN = Path(sys.executable).with_name("horovodrun")

try:
    import horovod.tensorflow as _hvd

    SKIP = None if _hvd.gloo_built() else "this Horovod was built without Gloo"
except ImportError as error:
    SKIP = f"Horovod is not installed in this environment ({error}); `make horovod` builds it"
if SKIP is None and not HOROVODRUN.exists():
    SKIP = f"horovodrun is missing beside {sys.executable}"
if SKIP:
    pytestmark = [pytestmark, pytest.mark.skip(reason=SKIP)]


def _launch(*args, timeout=600):
    command = [
        str(HOROVODRUN),
        "-np",
        "2",
        "-H",
        "localhost:2",
        "--gloo",
        sys.executable,
        str(WORKER),
        *map(str, args),
    ]
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    return result, time.monotonic() - start


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("horovod")
    result, _ = _launch("train", out)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    ranks = [json.loads((out / f"results_rank{r}.json").read_text()) for r in (0, 1)]
    return out, ranks, result.stdout


def _weights(path):
    with np.load(path) as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


def _worker_module():
    sys.path.insert(0, str(WORKER.parent))
    try:
        import horovod_worker
    finally:
        sys.path.pop(0)
    return horovod_worker


def test_ranks_end_identical_and_equal_one_process_with_four_towers(trained, devices, weight_diff):
    out, ranks, _ = trained
    w0, w1 = _weights(out / "weights_rank0.npz"), _weights(out / "weights_rank1.npz")
    for a, b in zip(w0, w1, strict=True):
        np.testing.assert_array_equal(a, b)

    # One process, 4 towers, the same global batches, the same warm-up.
    worker = _worker_module()
    model = worker.make_model(seed=100)  # rank 0's seed: the broadcast wins
    parallel = replicate.replicate(model, devices)
    worker.compile_(parallel)
    x, y = worker.global_data()
    history = parallel.fit(
        x,
        y,
        batch_size=16,
        epochs=3,
        shuffle=False,
        verbose=0,
        callbacks=[
            replicate.callbacks.LearningRateWarmup(0.1, warmup_epochs=1, initial_learning_rate=0.05)
        ],
    )
    reference = keras.models.clone_model(model)
    reference.set_weights(w0)
    assert weight_diff(model, reference) <= 1e-5
    # The loss Keras shows is averaged over the processes.
    np.testing.assert_allclose(ranks[0]["loss"], history.history["loss"], rtol=1e-5)
    assert ranks[0]["loss"] == ranks[1]["loss"]
    assert ranks[0]["learning_rate"] == pytest.approx([0.0875, 0.1, 0.1])


def test_only_rank_zero_writes_and_prints(trained):
    out, ranks, stdout = trained
    assert ranks[0]["is_chief"] and not ranks[1]["is_chief"]
    assert (out / "checkpoint_rank0.keras").exists()
    assert not (out / "checkpoint_rank1.keras").exists()
    assert (out / "saved_rank0.keras").exists() and not (out / "saved_rank1.keras").exists()
    assert (out / "tensorboard_rank0").is_dir() and not (out / "tensorboard_rank1").exists()
    assert "[0]<stdout>:Epoch 1/3" in stdout
    assert "[1]<stdout>:Epoch" not in stdout
    loaded = keras.models.load_model(out / "checkpoint_rank0.keras")
    assert loaded.name == "mlp"


def test_uneven_data_finishes_on_both_ranks(trained, devices):
    out, ranks, _ = trained
    assert ranks[0]["uneven_epochs"] == ranks[1]["uneven_epochs"] == 2
    assert ranks[0]["uneven_val_loss"] == ranks[1]["uneven_val_loss"]
    u0, u1 = _weights(out / "uneven_rank0.npz"), _weights(out / "uneven_rank1.npz")
    for a, b in zip(u0, u1, strict=True):
        np.testing.assert_array_equal(a, b)
        assert np.isfinite(a).all()

    # evaluate() across processes equals one process evaluating all 190 samples.
    worker = _worker_module()
    model = worker.make_model(seed=5)
    model.set_weights(u0)
    worker.compile_(model)
    x = np.concatenate([worker.uneven_data(0)[0], worker.uneven_data(1)[0]])
    y = np.concatenate([worker.uneven_data(0)[1], worker.uneven_data(1)[1]])
    expected = model.evaluate(x, y, batch_size=32, verbose=0)
    assert ranks[0]["uneven_evaluate"] == ranks[1]["uneven_evaluate"]
    np.testing.assert_allclose(ranks[0]["uneven_evaluate"], expected, rtol=1e-5)


def test_evaluate_is_averaged_over_processes(trained):
    _, ranks, _ = trained
    assert ranks[0]["evaluate"] == ranks[1]["evaluate"]


def test_fp16_compression_reaches_the_same_loss(trained):
    _, ranks, _ = trained
    final = ranks[0]["final_loss"]
    assert abs(final["fp16"] - final["none"]) <= 0.05 * final["none"]
    assert final["none"] < 1.05  # it did train (chance is ln 3 = 1.0986)


def test_a_killed_rank_stops_the_others_in_time(tmp_path):
    result, seconds = _launch("fault", tmp_path, "die", timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert seconds < 120, seconds
    assert "Process name: 1" in output  # horovodrun names the lost rank
    assert "replicate: process 0 of 2 lost the other processes" in output


@pytest.mark.slow
def test_a_frozen_rank_stops_the_others_in_time(tmp_path):
    result, seconds = _launch("fault", tmp_path, "stall", timeout=300)
    assert result.returncode != 0
    assert seconds < 120, seconds
    assert "replicate: process 0 of 2 lost the other processes" in result.stdout + result.stderr


def test_unknown_compression(devices, mlp_factory):
    with pytest.raises(ValueError, match=r"compression='int8'.*\['none', 'fp16'\]"):
        replicate.replicate(mlp_factory(), devices, backend="horovod", compression="int8")


def test_horovodrun_is_the_project_build():
    assert shutil.which("horovodrun", path=str(HOROVODRUN.parent)) == str(HOROVODRUN)
