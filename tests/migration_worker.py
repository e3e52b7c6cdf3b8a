"""What each process of tests/test_migration.py runs under `horovodrun -np 2`.

Usage: migration_worker.py OUTPUT_DIR

A script half-moved from Horovod's Keras API: each leftover piece (the
optimizer wrapper, on `compile` and on a template compiled before
`replicate`; Horovod's callbacks) must be refused with its replacement before
any collective runs, on every rank alike. Then the migrated script trains with
`LearningRateWarmup` called as Horovod's warm-up was (`initial_lr`, `verbose`).
Writes `rank<R>.json` (the refusals, the learning rates) and `rank<R>.npz`.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import horovod.tensorflow.keras as hvd  # noqa: E402
import keras  # noqa: E402
import model_zoo  # noqa: E402
import numpy as np  # noqa: E402

import replicate  # noqa: E402
from replicate.callbacks import LearningRateWarmup  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    hvd.init()
    replicate.simulate_devices(2)
    backend = replicate.get_backend("horovod")
    rank, size = backend.rank, backend.size
    scaled = 0.05 * size  # Horovod's convention: the rate scaled by the processes
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = rng.integers(0, 3, 64).astype("int32")
    x_mine, y_mine = replicate.shard((x, y))
    refused = {}

    def attempt(name, call):
        try:
            call()
        except (TypeError, RuntimeError) as error:
            refused[name] = f"{type(error).__name__}: {error}"

    # 1. The optimizer wrapper, given to compile.
    model = model_zoo.mlp(seed=100 + rank)
    parallel = replicate.replicate(model, backend=backend)
    wrapped = hvd.DistributedOptimizer(keras.optimizers.SGD(scaled))
    attempt("DistributedOptimizer", lambda: model_zoo.compile_classifier(parallel, wrapped))
    # 2. ... or already on a template compiled before replicate().
    template = model_zoo.compile_classifier(
        model_zoo.mlp(), hvd.DistributedOptimizer(keras.optimizers.SGD(scaled))
    )
    early = replicate.replicate(template, backend=backend)
    attempt("compiled template", lambda: early.fit(x_mine, y_mine, epochs=1, verbose=0))
    # 3. Horovod's callbacks, each alone.
    model_zoo.compile_classifier(parallel, keras.optimizers.SGD(scaled))
    callbacks = {
        "BroadcastGlobalVariablesCallback": hvd.callbacks.BroadcastGlobalVariablesCallback(0),
        "MetricAverageCallback": hvd.callbacks.MetricAverageCallback(),
        "LearningRateWarmupCallback": hvd.callbacks.LearningRateWarmupCallback(
            initial_lr=scaled, warmup_epochs=1, verbose=1
        ),
        "CommitStateCallback": hvd.elastic.CommitStateCallback(None, batches_per_commit=1),
    }
    for name, callback in callbacks.items():
        attempt(name, lambda c=callback: parallel.fit(x_mine, y_mine, callbacks=[c], verbose=0))

    # The migrated script: Horovod's warm-up arguments, replicate's callback.
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_begin=lambda b, logs: seen.append(float(parallel.optimizer.learning_rate))
    )
    warmup = LearningRateWarmup(initial_lr=scaled, warmup_epochs=1, verbose=1)
    history = parallel.fit(
        x_mine, y_mine, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[warmup, record]
    )
    np.savez(out / f"rank{rank}.npz", *model.get_weights())
    result = {"refused": refused, "rates": seen, "loss": history.history["loss"], "size": size}
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
