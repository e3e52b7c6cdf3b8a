"""What each `horovodrun` process runs for tests/test_horovod.py.

Usage: horovod_worker.py SCENARIO OUTPUT_DIR
  train  equivalence with one process, checkpoints, uneven data, fp16 compression
  fault die|stall  rank 1 is killed (or frozen) in the middle of training
"""

import json
import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import replicate  # noqa: E402


def make_model(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(3)],
        name="mlp",
    )


def global_data(samples=64):
    rng = np.random.default_rng(3)
    return rng.normal(size=(samples, 6)).astype("float32"), rng.integers(0, 3, samples)


def compile_(model, lr=0.1):
    model.compile(
        optimizer=keras.optimizers.SGD(lr, momentum=0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def rank_batches(x, rank, size, global_batch):
    """Rank r takes the r-th part of every global batch, so that together the
    ranks see exactly the global batches one process would."""
    per = global_batch // size
    idx = np.concatenate(
        [np.arange(s + rank * per, s + (rank + 1) * per) for s in range(0, len(x), global_batch)]
    )
    return x[idx]


def uneven_data(rank):
    """Rank 0's 100 samples or rank 1's 90."""
    rng = np.random.default_rng(rank)
    n = 100 if rank == 0 else 90
    return rng.normal(size=(n, 6)).astype("float32"), rng.integers(0, 3, n)


def train(out: Path) -> None:
    parallel = None
    rank = replicate.data.process_rank()
    # Different seeds per rank: the broadcast from rank 0 must make them agree.
    model = make_model(seed=100 + rank)
    parallel = replicate.replicate(model, replicate.list_devices(), backend="horovod")
    size = parallel.backend.size
    compile_(parallel)
    x, y = global_data()
    xr, yr = rank_batches(x, rank, size, 16), rank_batches(y, rank, size, 16)
    history = parallel.fit(
        xr,
        yr,
        batch_size=16 // size,
        epochs=3,
        shuffle=False,
        verbose=2,
        callbacks=[
            keras.callbacks.ModelCheckpoint(out / f"checkpoint_rank{rank}.keras"),
            keras.callbacks.TensorBoard(out / f"tensorboard_rank{rank}"),
            replicate.callbacks.LearningRateWarmup(0.1, warmup_epochs=1),
        ],
    )
    parallel.save(out / f"saved_rank{rank}.keras")
    np.savez(out / f"weights_rank{rank}.npz", *model.get_weights())
    results = {
        "size": size,
        "is_chief": replicate.is_chief(),
        "loss": history.history["loss"],
        "learning_rate": history.history["learning_rate"],
        "evaluate": parallel.evaluate(xr, yr, batch_size=8, verbose=0),
    }

    # Uneven data: rank 0 holds 100 samples, rank 1 holds 90.
    xu, yu = uneven_data(rank)
    uneven = make_model(seed=5)
    p_uneven = replicate.replicate(uneven, replicate.list_devices(), backend="horovod")
    compile_(p_uneven, lr=0.05)
    h = p_uneven.fit(xu, yu, batch_size=32, epochs=2, verbose=0, validation_split=0.2)
    np.savez(out / f"uneven_rank{rank}.npz", *uneven.get_weights())
    # Metrics cover both processes' samples: 100 + 90, not the mean of two means.
    results["uneven_evaluate"] = p_uneven.evaluate(xu, yu, batch_size=32, verbose=0)
    results["uneven_epochs"] = len(h.history["loss"])
    results["uneven_val_loss"] = h.history["val_loss"]

    # fp16 compression against none, same start and data.
    final = {}
    for compression in ("none", "fp16"):
        m = make_model(seed=11)
        p = replicate.replicate(
            m, replicate.list_devices(), backend="horovod", compression=compression
        )
        compile_(p, lr=0.05)
        final[compression] = p.fit(xr, yr, batch_size=8, epochs=20, verbose=0).history["loss"][-1]
    results["final_loss"] = final
    (out / f"results_rank{rank}.json").write_text(json.dumps(results))


class _FailAt(keras.callbacks.Callback):
    def __init__(self, how):
        super().__init__()
        self.how = how

    def on_train_batch_begin(self, batch, logs=None):
        if batch == 3 and replicate.data.process_rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL if self.how == "die" else signal.SIGSTOP)


def fault(out: Path, how: str) -> None:
    model = make_model(seed=1)
    parallel = replicate.replicate(model, replicate.list_devices(), backend="horovod")
    compile_(parallel)
    x, y = global_data(4000)
    parallel.fit(x, y, batch_size=16, epochs=50, verbose=0, callbacks=[_FailAt(how)])


if __name__ == "__main__":
    replicate.simulate_devices(2)
    scenario, output = sys.argv[1], Path(sys.argv[2])
    if scenario == "train":
        train(output)
    else:
        fault(output, how=sys.argv[3])
