"""Multi-process backends under their real launchers: 2 processes x 2 simulated towers.

Each test runs for both backends: "horovod" under `horovodrun -np 2 --gloo`, and
"collective" under `replicate launch --nproc 2`.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import keras
import model_zoo
import numpy as np
import process_worker as worker
import pytest

import replicate

pytestmark = pytest.mark.processes

WORKER = Path(worker.__file__)
BIN = Path(sys.executable).parent

try:
    import horovod.tensorflow as _hvd

    HOROVOD_SKIP = None if _hvd.gloo_built() else "this Horovod was built without Gloo"
except ImportError as error:
    HOROVOD_SKIP = (
        f"Horovod is not installed in this environment ({error}); `make horovod` builds it"
    )

BACKENDS = [
    pytest.param(
        "horovod",
        marks=[
            pytest.mark.horovod,
            pytest.mark.skipif(HOROVOD_SKIP is not None, reason=str(HOROVOD_SKIP)),
        ],
    ),
    "collective",
]


def _command(backend, *args):
    run = [sys.executable, str(WORKER), backend, *map(str, args)]
    if backend == "horovod":
        return [str(BIN / "horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo", *run]
    return [str(BIN / "replicate"), "launch", "--nproc", "2", "--", *run]


def launch(backend, *args, timeout=600, **env):
    """Runs the worker as a 2-process job; returns (result, seconds)."""
    environ = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **env)
    start = time.monotonic()
    result = subprocess.run(
        _command(backend, *args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environ,
        cwd=WORKER.parent,
    )
    return result, time.monotonic() - start


def _weights(path):
    with np.load(path) as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


def _max_diff(a, b):
    return max(float(np.abs(u - v).max()) for u, v in zip(a, b, strict=True))


@pytest.fixture(scope="module", params=BACKENDS)
def trained(request, tmp_path_factory):
    backend = request.param
    out = tmp_path_factory.mktemp(f"train-{backend}")
    result, _ = launch(backend, "train", out)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    ranks = [json.loads((out / f"results_rank{r}.json").read_text()) for r in (0, 1)]
    return backend, out, ranks, result.stdout


def test_ranks_end_identical_and_equal_one_process_with_four_towers(trained, devices, weight_diff):
    _, out, ranks, _ = trained
    w0, w1 = _weights(out / "weights_rank0.npz"), _weights(out / "weights_rank1.npz")
    for a, b in zip(w0, w1, strict=True):
        np.testing.assert_array_equal(a, b)
    assert ranks[0]["devices"] == ["/cpu:0", "/cpu:1"]

    # One process, 4 towers, the same global batches, the same warm-up.
    model = model_zoo.mlp(seed=100)  # rank 0's seed: the broadcast wins
    parallel = replicate.replicate(model, devices)
    model_zoo.compile_classifier(parallel, keras.optimizers.SGD(0.1, momentum=0.5))
    x, y = worker.global_data(64)
    history = parallel.fit(
        x,
        y,
        batch_size=16,
        epochs=3,
        shuffle=False,
        verbose=0,
        callbacks=[
            replicate.callbacks.LearningRateWarmup(0.1, warmup_epochs=1, start_learning_rate=0.05)
        ],
    )
    assert _max_diff(model.get_weights(), w0) <= 1e-5
    # The loss Keras shows covers both processes.
    np.testing.assert_allclose(ranks[0]["loss"], history.history["loss"], rtol=1e-5)
    assert ranks[0]["loss"] == ranks[1]["loss"]
    assert ranks[0]["learning_rate"] == pytest.approx([0.0875, 0.1, 0.1])


def test_only_the_chief_writes_and_prints(trained):
    _, out, ranks, stdout = trained
    assert ranks[0]["is_chief"] and not ranks[1]["is_chief"]
    for name in ("checkpoint_rank{}.keras", "saved_rank{}.keras", "log_rank{}.csv"):
        assert (out / name.format(0)).exists() and not (out / name.format(1)).exists()
    assert (out / "tensorboard_rank0").is_dir() and not (out / "tensorboard_rank1").exists()
    assert not list(out.glob(".*partial*"))  # atomic writes left nothing behind
    lines = stdout.splitlines()
    assert any("Epoch 1/3" in line and line.startswith(("[0]", "[0]<stdout>")) for line in lines)
    assert not any("Epoch" in line and line.startswith(("[1]", "[1]<stdout>")) for line in lines)
    loaded = keras.models.load_model(out / "checkpoint_rank0.keras")
    assert loaded.name == "mlp" and isinstance(loaded.optimizer, keras.optimizers.SGD)


def test_uneven_data_and_every_input_kind_agree_on_steps(trained):
    _, out, ranks, _ = trained
    assert ranks[0]["uneven_val_loss"] == ranks[1]["uneven_val_loss"]
    u0, u1 = _weights(out / "uneven_rank0.npz"), _weights(out / "uneven_rank1.npz")
    for a, b in zip(u0, u1, strict=True):
        np.testing.assert_array_equal(a, b)
    # numpy, tf.data and PyDataset, training and validation, 4 vs 2 batches.
    assert len(ranks[0]["inputs"]) == 4
    for kind, result in ranks[0]["inputs"].items():
        assert result == ranks[1]["inputs"][kind], kind
        assert len(result["val_loss"]) == 2 and np.isfinite(result["val_loss"]).all(), kind
    assert "Pass `steps_per_epoch`" in ranks[0]["generator_error"]
    assert "a Python generator (`x`)" in ranks[1]["generator_error"]


def test_evaluate_covers_every_process(trained, devices):
    _, out, ranks, _ = trained
    assert ranks[0]["evaluate"] == ranks[1]["evaluate"]
    model = model_zoo.mlp(seed=5)
    model.set_weights(_weights(out / "uneven_rank0.npz"))
    model_zoo.compile_classifier(model)
    x = np.concatenate([worker.uneven_data(0)[0], worker.uneven_data(1)[0]])
    y = np.concatenate([worker.uneven_data(0)[1], worker.uneven_data(1)[1]])
    expected = model.evaluate(x, y, batch_size=32, verbose=0)
    assert ranks[0]["uneven_evaluate"] == ranks[1]["uneven_evaluate"]
    np.testing.assert_allclose(ranks[0]["uneven_evaluate"], expected, rtol=1e-5)


def test_no_threads_pile_up_over_hundreds_of_steps(trained):
    # TensorFlow starts a timer thread per timed collective; replicate's steps
    # must not leave one behind per step.
    _, _, ranks, _ = trained
    for rank in ranks:
        first, last = rank["threads"]
        assert last - first < 40, rank["threads"]


def test_fp16_compression_reaches_the_same_loss(trained):
    _, _, ranks, _ = trained
    final = ranks[0]["final_loss"]
    assert abs(final["fp16"] - final["none"]) <= 0.05 * final["none"]
    assert final["none"] < 1.05  # it did train (chance is ln 3 = 1.0986)


@pytest.mark.parametrize("name", list(worker.MATRIX))
def test_matrix_row_equals_four_local_towers(name, trained, devices):
    """The multi-process column of the README's compatibility matrix."""
    backend, out, ranks, _ = trained
    w0, w1 = (_weights(out / f"matrix_{name}_rank{r}.npz") for r in (0, 1))
    for a, b in zip(w0, w1, strict=True):
        np.testing.assert_array_equal(a, b)
    model = worker.matrix_model(name)
    parallel = replicate.replicate(model, devices)
    worker.compile_matrix(parallel, name)
    x, y = worker.global_data()
    xr, yr, kwargs = worker.matrix_fit_args(name, x, y)
    history = parallel.fit(xr, yr, **kwargs).history
    tolerance = {"mixed_float16": 2e-3, "mixed_bfloat16": 2e-2}.get(name, 1e-5)
    assert _max_diff(model.get_weights(), w0) <= tolerance
    got = ranks[0]["matrix"][name]
    for key, values in history.items():
        np.testing.assert_allclose(
            got["history"][key], values, rtol=max(tolerance, 1e-5), err_msg=key
        )
    if name == "mixed_float16":
        assert got["scale"] == float(parallel.optimizer.dynamic_scale) < 2.0**40
    if name == "synchronized_bn":
        # Its sums meet inside the graph over the job, under either backend: each traced
        # step traces the forward pass once for both towers (threads traced it per tower).
        assert got["in_graph"]
        assert got["train_traces"] >= 1
        assert got["traces"] == got["train_traces"]
    if name == "callbacks":  # every process stopped at the same, reduced, epoch
        assert len(history["loss"]) < 8 and min(history["learning_rate"]) < 0.1


def test_synchronized_towers_of_uneven_processes_equal_one_device(trained):
    # Rank 0 holds 2 towers, rank 1 one: no meeting inside the graph over the job (it
    # needs as many towers everywhere); under the collective backend the towers meet in
    # threads, as one device computes. Under Horovod such meetings do not match (they
    # hung until the watchdog): an error.
    backend, out, ranks, _ = trained
    if backend == "horovod":
        for r in ranks:
            assert r["uneven_towers"]["error"].startswith(
                "The processes of this job hold different numbers of towers ([2, 1], by rank)"
            )
        return
    assert [r["uneven_towers"]["in_graph"] for r in ranks] == [False, False]
    w0, w1 = (_weights(out / f"uneven_towers_rank{r}.npz") for r in (0, 1))
    for a, b in zip(w0, w1, strict=True):
        np.testing.assert_array_equal(a, b)
    model = model_zoo.synchronized_bn(seed=11)
    model_zoo.compile_classifier(model)
    x, y = worker.global_data()
    model.fit(x, y, batch_size=worker.GLOBAL_BATCH, epochs=2, shuffle=False, verbose=0)
    assert _max_diff(model.get_weights(), w0) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_killed_process_ends_the_job(backend, tmp_path):
    result, seconds = launch(backend, "fault", tmp_path, "die", timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert seconds < 120, seconds
    if backend == "horovod":
        assert "Process name: 1" in output  # horovodrun names the lost rank
    else:
        assert "replicate launch: process 1 of 2 exited with signal 9" in output


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_frozen_process_ends_the_job(backend, tmp_path):
    result, seconds = launch(
        backend, "fault", tmp_path, "stall", timeout=300, REPLICATE_HANG_TIMEOUT="15"
    )
    assert result.returncode != 0
    assert seconds < 120, seconds
    assert "replicate: process 0 of 2" in result.stdout + result.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_process_that_hangs_in_a_callback_is_named(backend, tmp_path):
    result, seconds = launch(
        backend, "fault", tmp_path, "sleep", timeout=300, REPLICATE_HANG_TIMEOUT="10"
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert seconds < 90, seconds
    assert "replicate: process 1 of 2 made no progress for" in output
    assert "in a callback" in output and "time.sleep(3600)" in output  # where it was


@pytest.mark.parametrize("mode", ["epoch", "batch"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_after_a_crash_equals_an_uninterrupted_run(backend, mode, tmp_path):
    crashed, _ = launch(backend, "resume", tmp_path, mode, CRASH="1")
    assert crashed.returncode != 0, crashed.stdout[-3000:] + crashed.stderr[-3000:]
    assert (tmp_path / f"backup-{mode}" / "latest.json").exists()
    assert not (tmp_path / f"uninterrupted-{mode}").exists()  # removed after a normal end
    resumed, _ = launch(backend, "resume", tmp_path, mode)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    expected = _weights(tmp_path / f"uninterrupted_{mode}_rank0.npz")
    for rank in (0, 1):
        assert _max_diff(_weights(tmp_path / f"resumed_{mode}_rank{rank}.npz"), expected) <= 1e-6
    assert not (tmp_path / f"backup-{mode}").exists()


@pytest.mark.parametrize("backend", BACKENDS)
def test_consistency_check_names_the_process_that_differs(backend, tmp_path):
    result, _ = launch(backend, "consistency", tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert (
        "ConsistencyCheck at batch 8 of epoch 1: process 1 of 2: weights differ from process 0"
        in output
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluating_on_the_chief_only(backend, tmp_path, devices):
    result, seconds = launch(backend, "chief", tmp_path, timeout=300, REPLICATE_HANG_TIMEOUT="15")
    output = result.stdout + result.stderr
    assert seconds < 150
    assert json.loads((tmp_path / "chief_local.json").read_text())  # the documented way ran
    assert result.returncode != 0  # parallel.evaluate on one process: an error, not a hang
    assert "replicate: process 0 of 2" in output


def test_unknown_compression(devices, mlp_factory):
    with pytest.raises(ValueError, match=r"compression='int8'.*\['none', 'fp16'\]"):
        replicate.replicate(mlp_factory(), devices, backend="collective", compression="int8")


@pytest.mark.skipif(HOROVOD_SKIP is not None, reason=str(HOROVOD_SKIP))
def test_horovodrun_is_the_project_build():
    assert shutil.which("horovodrun", path=str(BIN)) == str(BIN / "horovodrun")


# -- what the processes agree on (issue 23) -----------------------------------------


@pytest.fixture(scope="module", params=BACKENDS)
def agreed(request, tmp_path_factory):
    """One job: names, steps_per_epoch with a short shard, stop_training, writers, shards."""
    backend = request.param
    out = tmp_path_factory.mktemp(f"agree-{backend}")
    start = model_zoo.mlp(seed=100)
    model_zoo.compile_classifier(start, keras.optimizers.SGD(0.1, momentum=0.5))
    start.optimizer.build(start.trainable_variables)
    start.save(out / "start.keras")  # what the chief loads
    result, _ = launch(backend, "agree", out)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    ranks = [json.loads((out / f"agree_rank{r}.json").read_text()) for r in (0, 1)]
    return backend, out, ranks


def _same_on_both_ranks(out, name):
    w0, w1 = (_weights(out / f"{name}_rank{r}.npz") for r in (0, 1))
    for a, b in zip(w0, w1, strict=True):
        np.testing.assert_array_equal(a, b)
    return w0


@pytest.mark.parametrize("case", ["loaded", "extra", "synchronized"])
def test_variables_named_differently_train_like_four_local_towers(case, agreed, devices):
    # "synchronized": the layers' names differ where a synchronized layer's towers meet in
    # the graph (Horovod matches its ops by name: named after the layers, they hung).
    _, out, ranks = agreed
    got = ranks[0][f"names_{case}"]
    assert got["names"] != ranks[1][f"names_{case}"]["names"]  # e.g. dense/... vs mlp/dense/...
    w0 = _same_on_both_ranks(out, f"names_{case}")
    if case == "loaded":
        model = keras.models.load_model(out / "start.keras")
    elif case == "synchronized":
        model = model_zoo.synchronized_bn(seed=100)
        model_zoo.compile_classifier(model, keras.optimizers.SGD(0.1, momentum=0.5))
    else:
        model = model_zoo.mlp(seed=100)  # the chief's start wins the broadcast
        model_zoo.compile_classifier(model, keras.optimizers.SGD(0.1, momentum=0.5))
    parallel = replicate.replicate(model, devices)
    x, y = worker.global_data()
    history = parallel.fit(x, y, batch_size=worker.GLOBAL_BATCH, epochs=2, shuffle=False, verbose=0)
    assert _max_diff(model.get_weights(), w0) <= 1e-5
    np.testing.assert_allclose(got["loss"], history.history["loss"], rtol=1e-5)


class GlobalBatches(keras.utils.PyDataset):
    """The global batches of a short-shard job: both ranks' batch i while both have one."""

    def __init__(self, parts):
        super().__init__()
        b = worker.STEPS_BATCH
        self.batches = []
        for i in range(max(-(-len(p[0]) // b) for p in parts)):
            pieces = [(x[i * b : (i + 1) * b], y[i * b : (i + 1) * b]) for x, y in parts]
            self.batches.append(tuple(np.concatenate(k) for k in zip(*pieces)))

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


@pytest.mark.parametrize("kind", ["dataset", "generator"])
def test_steps_per_epoch_with_a_short_shard_follows_the_uneven_rule(kind, agreed, devices):
    """10 batches on rank 0, 6 on rank 1, steps_per_epoch=5 over 2 epochs: every process
    runs the 10 steps, rank 1 adds nothing to the last 4 (as 4 local towers given only
    rank 0's samples there)."""
    _, out, ranks = agreed
    got = ranks[0][f"steps_{kind}"]
    assert got == ranks[1][f"steps_{kind}"] and got["iterations"] == 10
    w0 = _same_on_both_ranks(out, f"steps_{kind}")
    train, val = zip(*(worker.short_shards(r) for r in (0, 1)))
    model = model_zoo.mlp(seed=21)
    parallel = replicate.replicate(model, devices)
    model_zoo.compile_classifier(parallel, keras.optimizers.SGD(0.1, momentum=0.5))
    history = parallel.fit(
        GlobalBatches(train),
        epochs=2,
        steps_per_epoch=5,
        validation_data=GlobalBatches(val),
        validation_steps=3,
        shuffle=False,  # a PyDataset is shuffled by default; the processes' data is not
        verbose=0,
    ).history
    assert _max_diff(model.get_weights(), w0) <= 1e-5
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose(got["history"][key], history[key], rtol=1e-5, err_msg=key)


def test_generators_that_all_ran_out_stop_every_process(agreed):
    """Over 3 epochs of 5 steps, rank 0's 10 batches run out after epoch 2: the first step
    of epoch 3 has no sample anywhere, and both stop there, as Keras does alone."""
    _, out, ranks = agreed
    got = ranks[0]["steps_generator_ran_out"]
    assert got == ranks[1]["steps_generator_ran_out"]
    assert got["iterations"] == 11 and len(got["history"]["loss"]) == 3
    _same_on_both_ranks(out, "steps_generator_ran_out")


def test_stop_training_on_one_process_stops_both_after_the_same_step(agreed):
    _, out, ranks = agreed
    # Rank 1 stops after step 3 of epoch 1: the wish travels with step 4, after which
    # both stop. Rank 1 stops before step 3: the wish travels with step 3, after which
    # both stop. Rank 0 stops at the end of epoch 2: both stop there.
    assert ranks[0]["stop_batch"] == ranks[1]["stop_batch"] == {"epochs": 1, "iterations": 4}
    assert ranks[0]["stop_begin"] == ranks[1]["stop_begin"] == {"epochs": 1, "iterations": 3}
    assert ranks[0]["stop_epoch"] == ranks[1]["stop_epoch"] == {"epochs": 2, "iterations": 10}
    for where in ("batch", "begin", "epoch"):
        _same_on_both_ranks(out, f"stop_{where}")


def test_export_and_save_are_written_once_by_the_chief(agreed):
    _, out, ranks = agreed
    base = out / "serving"
    failed = [rank["written"].pop("failed") for rank in ranks]
    assert failed[0].startswith("FileExistsError: Version 1 already exists")
    assert failed[1] == (
        "RuntimeError: replicate: the chief (process 0 of 2) failed in `export`, so nothing "
        "was written; its own output shows the error."
    )
    written = ranks[0]["written"]
    assert written == ranks[1]["written"]  # the same paths, seen complete on both
    assert written["paths"] == [str(base / "1"), str(base / "2")]
    assert written["listed"] == [["1"], ["1", "2"]]  # one version per call, no second writer
    assert sorted(p.name for p in base.iterdir()) == ["1", "2"]  # nothing half-written left
    assert written["saved_seen"]  # the other process returned after the chief's save


def test_shard_refuses_a_dataset_shuffled_before_it(agreed):
    _, _, ranks = agreed
    for rank in ranks:
        assert "shard before shuffling" in rank["shuffle"]["refused"]
    first, second = (set(r["shuffle"]["elements"]) for r in ranks)
    assert not first & second and first | second == set(range(64))


def test_sparse_gradients_summed_densely_across_processes_are_named(agreed):
    _, _, ranks = agreed
    for rank in ranks:
        (warning,) = set(rank["sparse"]["adam"])  # one message, however often traced
        assert warning.startswith("replicate: the gradients of `ids/embeddings` are sparse")
        assert "Adam on one device squares each looked-up row" in warning
        assert rank["sparse"]["sgd"] == []  # linear in the gradient: exact, nothing to say


@pytest.mark.parametrize("backend", BACKENDS)
def test_processes_that_disagree_stop_at_once_naming_both_positions(backend, tmp_path):
    result, _ = launch(backend, "disagree", tmp_path, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    ranks = [json.loads((tmp_path / f"disagree_rank{r}.json").read_text()) for r in (0, 1)]
    expected = {
        "epochs": "process 0 is in fit, epoch 3, before step 1; "
        "process 1 is in evaluate after epoch 2.",
        "evaluate_or_save": "process 0 is in evaluate after epoch 1; "
        "process 1 is in save after epoch 1.",
        "chief_evaluates": "process 0 is in evaluate before any training epoch; "
        "process 1 is at the start of fit (epoch 1).",
        "models": "variable 1 is `mlp/hidden/kernel` (6, 16) float32 on process 0 (6 variables); "
        "`mlp/hidden/kernel` (6, 8) float32 on process 1 (6 variables).",
    }
    for case, text in expected.items():
        errors = [rank[case]["error"] for rank in ranks]
        assert errors[0] == errors[1], case  # the same error on every process
        assert errors[0].startswith("DisagreementError: replicate: the processes"), errors[0]
        assert text in errors[0], (case, errors[0])
        assert max(rank[case]["seconds"] for rank in ranks) < 30, case


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_chief_write_longer_than_the_hang_limit_finishes(backend, tmp_path):
    """ModelCheckpoint every 3 batches, then save: each write takes 31 s, over 3 x the 10 s
    hang limit, so the chief and the process waiting for it would both have been stopped
    had their watchdogs counted it. (The limit leaves the rest of fit time on this loaded
    2-core machine: with 3 s and 7 s limits, the end of a fit took longer here at times.)"""
    result, _ = launch(
        backend, "slow", tmp_path, timeout=400, REPLICATE_HANG_TIMEOUT="10", SLOW_SAVE="31"
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    for name in ("every3.keras", "after.keras"):
        assert (tmp_path / name).is_file(), name
    for rank in (0, 1):
        assert json.loads((tmp_path / f"slow_rank{rank}.json").read_text())["seconds"] >= 62
