"""What each process of a multi-process test runs (tests/test_processes.py).

Usage: process_worker.py BACKEND SCENARIO OUTPUT_DIR [ARG]

BACKEND is "horovod" (under horovodrun) or "collective" (under replicate launch).
Every process has 2 simulated towers; the tests compare 2 processes x 2 towers
with one process of 4 towers fed the same global batches.

  train        equivalence, chief-only writes, uneven data, every input kind,
               compression, and the multi-process column of the compatibility matrix
  fault HOW    rank 1 is killed (die), frozen (stall), sleeps in a callback (sleep) or
               in its data loader (loader)
  resume MODE  BackupAndRestore: uninterrupted run, then a crash (MODE epoch|batch),
               then the same command resumes (CRASH unset)
  consistency  rank 1's weights are changed at batch 5; ConsistencyCheck(4) finds it
  chief        evaluate on the chief only
  agree        what processes must agree on: variables named differently on the chief
               (a loaded model, an extra model), steps_per_epoch with a short shard
               (tf.data and a generator), stop_training on one process, export and save
               on the chief only, shard before shuffle
  disagree     processes at different points (or with different models): each case's
               error and how long it took
  slow         the chief's writes (ModelCheckpoint every 3 batches, then save) take
               SLOW_SAVE seconds each, longer than 3 x REPLICATE_HANG_TIMEOUT
"""

import json
import os
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import model_zoo  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import replicate  # noqa: E402

GLOBAL_BATCH = 14  # 7 per process, split 4/3 over its towers; 4 local towers: 4/4/3/3


def global_data(samples=70, seed=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, 6)).astype("float32")
    return x, rng.integers(0, 3, samples).astype("int32")


def rank_batches(a, rank, size, global_batch=GLOBAL_BATCH):
    """Rank r takes the r-th part of every global batch, so that together the
    ranks see exactly the global batches one process would."""
    per = global_batch // size
    starts = range(0, len(a), global_batch)
    return np.concatenate([a[s + rank * per : s + (rank + 1) * per] for s in starts])


def uneven_data(rank):
    """Rank 0's 100 samples or rank 1's 90."""
    rng = np.random.default_rng(rank)
    n = 100 if rank == 0 else 90
    return rng.normal(size=(n, 6)).astype("float32"), rng.integers(0, 3, n).astype("int32")


class Batches(keras.utils.PyDataset):
    def __init__(self, x, y, batch_size):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self):
        return -(-len(self.x) // self.batch_size)

    def __getitem__(self, i):
        part = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return self.x[part], self.y[part]


# -- the compatibility matrix, multi-process column -------------------------------
# name -> (make, compile, inputs); compared by the test with 4 local towers.


def _optimizer(name):
    return {
        "gradient_accumulation": lambda: keras.optimizers.SGD(0.1, gradient_accumulation_steps=2),
        "clipnorm": lambda: keras.optimizers.SGD(0.5, clipnorm=0.05),
        "global_clipnorm": lambda: keras.optimizers.SGD(0.5, global_clipnorm=0.05),
        "use_ema": lambda: keras.optimizers.Adam(0.01, use_ema=True, ema_overwrite_frequency=3),
        "loss_scale": lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1)),
        "mixed_float16": lambda: keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(0.1), initial_scale=2.0**40, dynamic_growth_steps=4
        ),
    }[name]()


MATRIX = {
    "sample_weight": {},
    "class_weight": {},
    "validation_data": {},
    "steps_per_execution": {"steps_per_execution": 3},
    "gradient_accumulation": {},
    "clipnorm": {},
    "global_clipnorm": {},
    "use_ema": {},
    "loss_scale": {},
    "mixed_float16": {},
    "mixed_bfloat16": {},
    "compute_loss": {},
    "train_step": {},
    "synchronized_bn": {},
    "multi_input": {},
    "callbacks": {},
}


def matrix_model(name):
    """A fresh model for a matrix row, compiled; also used by the test process."""
    if name in ("mixed_float16", "mixed_bfloat16"):
        keras.mixed_precision.set_global_policy(name)
    try:
        if name == "train_step":
            return model_zoo.compile_two(model_zoo.two_step())
        make = {
            "compute_loss": model_zoo.own_loss,
            "synchronized_bn": model_zoo.synchronized_bn,
            "multi_input": model_zoo.multi_input,
        }.get(name, model_zoo.mlp)
        model = make()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return model


def compile_matrix(model, name):
    optimizer = (
        _optimizer(name)
        if name
        in (
            "gradient_accumulation",
            "clipnorm",
            "global_clipnorm",
            "use_ema",
            "loss_scale",
            "mixed_float16",
        )
        else None
    )
    if name == "train_step":
        return model_zoo.compile_two(model)
    if name == "mixed_bfloat16":
        optimizer = keras.optimizers.Adam(0.01)
    return model_zoo.compile_classifier(model, optimizer, **MATRIX[name])


def matrix_fit_args(name, x, y, rank=0, size=1):
    """fit's arguments for a row: this rank's part of every global batch."""
    xr, yr = rank_batches(x, rank, size), rank_batches(y, rank, size)
    kwargs = {"batch_size": GLOBAL_BATCH // size, "epochs": 2, "shuffle": False, "verbose": 0}
    if name == "sample_weight":
        kwargs["sample_weight"] = rank_batches(
            np.linspace(0.2, 2.0, len(x)).astype("float32"), rank, size
        )
    if name == "class_weight":
        kwargs["class_weight"] = {0: 1.0, 1: 3.0, 2: 0.5}
    if name == "validation_data":
        kwargs["validation_data"] = (
            rank_batches(x[:28], rank, size),
            rank_batches(y[:28], rank, size),
        )
    if name == "multi_input":
        xr = model_zoo.split_inputs(xr)
    if name == "callbacks":
        kwargs["epochs"] = 8
        kwargs["validation_data"] = (
            rank_batches(x[:28], rank, size),
            rank_batches(y[:28], rank, size),
        )
        kwargs["callbacks"] = [
            keras.callbacks.EarlyStopping("val_loss", patience=2, min_delta=0.5),
            keras.callbacks.ReduceLROnPlateau("val_loss", factor=0.5, patience=0, min_delta=1.0),
        ]
    return xr, yr, kwargs


def run_matrix(out, backend):
    rank, size = backend.rank, backend.size
    x, y = global_data()
    results = {}
    for name in MATRIX:
        model = matrix_model(name)
        parallel = replicate.replicate(model, backend=backend)
        compile_matrix(parallel, name)
        xr, yr, kwargs = matrix_fit_args(name, x, y, rank, size)
        history = parallel.fit(xr, yr, **kwargs).history
        np.savez(out / f"matrix_{name}_rank{rank}.npz", *model.get_weights())
        extra = {}
        if name == "mixed_float16":
            extra["scale"] = float(parallel.optimizer.dynamic_scale)
        if name == "synchronized_bn":
            extra["traces"] = parallel.builder.tower_pass.traces
            extra["train_traces"] = parallel.builder.train_traces
            extra["in_graph"] = parallel.builder.met_in_graph
        results[name] = {"history": history, **extra}
    return results


def uneven_towers(out, backend):
    """Synchronized BatchNormalization where rank 0 holds 2 towers and rank 1 one: meeting
    inside the graph needs as many towers in every process, so under the collective
    backend they meet in threads and train as one device does; under Horovod tower k of
    one process would wait for a tower k another process does not hold: an error."""
    rank, size = backend.rank, backend.size
    model = model_zoo.synchronized_bn(seed=11)
    devices = replicate.process_devices()
    parallel = replicate.replicate(model, devices if rank == 0 else devices[:1], backend=backend)
    model_zoo.compile_classifier(parallel)
    x, y = global_data()
    xr, yr = rank_batches(x, rank, size), rank_batches(y, rank, size)
    try:
        parallel.fit(xr, yr, batch_size=GLOBAL_BATCH // size, epochs=2, shuffle=False, verbose=0)
    except ValueError as error:
        return {"error": str(error)}
    np.savez(out / f"uneven_towers_rank{rank}.npz", *model.get_weights())
    return {"in_graph": parallel.builder.met_in_graph}


# -- scenarios ----------------------------------------------------------------------


def train(out, backend):
    rank, size = backend.rank, backend.size
    # Different seeds per rank: the broadcast from rank 0 must make them agree.
    model = model_zoo.mlp(seed=100 + rank)
    parallel = replicate.replicate(model, backend=backend)
    model_zoo.compile_classifier(parallel, keras.optimizers.SGD(0.1, momentum=0.5))
    x, y = global_data(64)
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
            keras.callbacks.CSVLogger(out / f"log_rank{rank}.csv"),
            replicate.callbacks.LearningRateWarmup(0.1, warmup_epochs=1),
            replicate.callbacks.ConsistencyCheck(every_n_batches=1),
        ],
    )
    threads_after_first_fit = len(os.listdir("/proc/self/task"))
    parallel.save(out / f"saved_rank{rank}.keras")
    np.savez(out / f"weights_rank{rank}.npz", *model.get_weights())
    results = {
        "size": size,
        "is_chief": replicate.is_chief(),
        "devices": parallel.devices,
        "loss": history.history["loss"],
        "learning_rate": history.history["learning_rate"],
        "evaluate": parallel.evaluate(xr, yr, batch_size=8, verbose=0),
    }

    # Uneven data: rank 0 holds 100 samples, rank 1 holds 90.
    xu, yu = uneven_data(rank)
    uneven = model_zoo.mlp(seed=5)
    p_uneven = replicate.replicate(uneven, backend=backend)
    model_zoo.compile_classifier(p_uneven, keras.optimizers.SGD(0.05))
    h = p_uneven.fit(xu, yu, batch_size=32, epochs=2, verbose=0, validation_split=0.2)
    np.savez(out / f"uneven_rank{rank}.npz", *uneven.get_weights())
    # Metrics cover both processes' samples: 100 + 90, not the mean of two means.
    results["uneven_evaluate"] = p_uneven.evaluate(xu, yu, batch_size=32, verbose=0)
    results["uneven_val_loss"] = h.history["val_loss"]

    # Every kind of input, training and validation, with uneven step counts:
    # each finishes (a hang fails the test by its time limit).
    n = 60 if rank == 0 else 30
    xs, ys = xu[:n], yu[:n]
    dataset = tf.data.Dataset.from_tensor_slices((xs, ys)).batch(15)  # 4 vs 2 batches
    kinds = {
        "numpy x, tf.data validation": ((xs, ys), {"validation_data": dataset}),
        "numpy x, PyDataset validation": ((xs, ys), {"validation_data": Batches(xs, ys, 15)}),
        "tf.data x, tuple validation": ((dataset,), {"validation_data": (xs, ys)}),
        "PyDataset x, PyDataset validation": (
            (Batches(xs, ys, 15),),
            {"validation_data": Batches(xs, ys, 10)},
        ),
    }
    results["inputs"] = {}
    for kind, (args, kwargs) in kinds.items():
        m = replicate.replicate(model_zoo.mlp(seed=9), backend=backend)
        model_zoo.compile_classifier(m)
        hk = m.fit(
            *args, batch_size=15 if len(args) == 2 else None, epochs=2, verbose=0, **kwargs
        ).history
        results["inputs"][kind] = {
            "val_loss": hk["val_loss"],
            "evaluate": m.evaluate(Batches(xs, ys, 15), verbose=0),
        }
    try:
        m.fit((b for b in [(xs, ys)]), epochs=1, verbose=0)
    except ValueError as error:
        results["generator_error"] = str(error)

    # fp16 compression against none, same start and data.
    final = {}
    for compression in ("none", "fp16"):
        m = model_zoo.mlp(seed=11)
        p = replicate.replicate(m, backend=backend.name, compression=compression)
        model_zoo.compile_classifier(p, keras.optimizers.SGD(0.05))
        final[compression] = p.fit(xr, yr, batch_size=8, epochs=20, verbose=0).history["loss"][-1]
    results["final_loss"] = final
    results["matrix"] = run_matrix(out, backend)
    results["uneven_towers"] = uneven_towers(out, backend)
    # Hundreds of steps later: no thread per collective left behind.
    results["threads"] = [threads_after_first_fit, len(os.listdir("/proc/self/task"))]
    (out / f"results_rank{rank}.json").write_text(json.dumps(results))


class FailAt(keras.callbacks.Callback):
    def __init__(self, how, rank):
        super().__init__()
        self.how, self.rank = how, rank

    def on_train_batch_begin(self, batch, logs=None):
        if batch == 3 and self.rank == 1:
            if self.how == "sleep":
                time.sleep(3600)  # alive, not arriving
            os.kill(os.getpid(), signal.SIGKILL if self.how == "die" else signal.SIGSTOP)


def fault(out, backend, how):
    model = model_zoo.mlp(seed=1)
    parallel = replicate.replicate(model, backend=backend)
    model_zoo.compile_classifier(parallel)
    x, y = global_data(4000)
    parallel.fit(x, y, batch_size=16, epochs=50, verbose=0, callbacks=[FailAt(how, backend.rank)])


class CrashAt(keras.callbacks.Callback):
    """Rank 1 dies hard (no cleanup) at the given point of the first run."""

    def __init__(self, mode, rank):
        super().__init__()
        self.mode, self.rank, self.epoch = mode, rank, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if self.mode == "epoch" and epoch == 1 and self.rank == 1:
            os._exit(1)

    def on_train_batch_end(self, batch, logs=None):
        if self.mode == "batch" and self.epoch == 2 and batch == 4 and self.rank == 1:
            os._exit(1)


def resume(out, backend, mode):
    rank, size = backend.rank, backend.size
    x, y = global_data()
    xr, yr = rank_batches(x, rank, size), rank_batches(y, rank, size)

    def job(backup, seed, callbacks=()):
        model = model_zoo.mlp(seed=seed + rank)
        parallel = replicate.replicate(model, backend=backend)
        model_zoo.compile_classifier(parallel, keras.optimizers.Adam(0.01))
        save_freq = "epoch" if mode == "epoch" else 3
        parallel.fit(
            xr,
            yr,
            batch_size=GLOBAL_BATCH // size,
            epochs=4,
            shuffle=False,
            verbose=0,
            callbacks=[keras.callbacks.BackupAndRestore(backup, save_freq=save_freq), *callbacks],
        )
        return model

    if os.environ.get("CRASH"):
        full = job(out / f"uninterrupted-{mode}", seed=200)
        np.savez(out / f"uninterrupted_{mode}_rank{rank}.npz", *full.get_weights())
        job(out / f"backup-{mode}", seed=200, callbacks=[CrashAt(mode, rank)])
        return
    # A new process starts from other weights; the backup's replace them.
    resumed = job(out / f"backup-{mode}", seed=300)
    np.savez(out / f"resumed_{mode}_rank{rank}.npz", *resumed.get_weights())
    (out / f"resumed_{mode}_rank{rank}.json").write_text(
        json.dumps({"backup_left": (out / f"backup-{mode}").exists()})
    )


class ChangeWeightsAt(keras.callbacks.Callback):
    def __init__(self, rank):
        super().__init__()
        self.rank = rank

    def on_train_batch_begin(self, batch, logs=None):
        if batch == 5 and self.rank == 1:
            kernel = self.model.template.layers[0].kernel
            kernel.assign(kernel + 1e-3)


def consistency(out, backend):
    model = model_zoo.mlp(seed=1)
    parallel = replicate.replicate(model, backend=backend)
    model_zoo.compile_classifier(parallel)
    x, y = global_data(400)
    parallel.fit(
        x,
        y,
        batch_size=16,
        epochs=1,
        verbose=0,
        callbacks=[ChangeWeightsAt(backend.rank), replicate.callbacks.ConsistencyCheck(4)],
    )


def chief_only(out, backend):
    """The chief evaluates alone: the documented way works; parallel.evaluate
    after the other process has left ends with replicate's message."""
    model = model_zoo.mlp(seed=1)
    parallel = replicate.replicate(model, backend=backend)
    model_zoo.compile_classifier(parallel)
    x, y = global_data(64)
    parallel.fit(x, y, batch_size=16, epochs=1, verbose=0)
    if backend.rank != 0:
        return
    local = parallel.template.evaluate(x, y, verbose=0)
    (out / "chief_local.json").write_text(json.dumps(local))
    time.sleep(2)  # the other process has exited
    parallel.evaluate(x, y, verbose=0)


# -- agreement: names, steps, stopping, writers, shards ---------------------------------

STEPS_BATCH = 7  # per process


def short_shards(rank):
    """Rank 0 holds 10 batches of 7 samples, rank 1 holds 6 (and 3 vs 1 for validation)."""
    x, y = global_data(112 + 28, seed=5)
    train = slice(0, 70) if rank == 0 else slice(70, 112)
    val = slice(112, 133) if rank == 0 else slice(133, 140)
    return (x[train], y[train]), (x[val], y[val])


def names_case(out, backend, case):
    """Rank 0's variables are named differently from rank 1's; the broadcast matches them
    by position. Returns the history."""
    rank, size = backend.rank, backend.size
    if case == "loaded" and rank == 0:
        model = keras.models.load_model(out / "start.keras")  # hidden/... vs mlp/hidden/...
    else:
        if case == "extra" and rank == 0:
            keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])  # shifts dense_N names
        if case == "synchronized" and rank == 0:
            keras.layers.BatchNormalization()  # shifts batch_normalization_N names
        make = model_zoo.synchronized_bn if case == "synchronized" else model_zoo.mlp
        model = make(seed=100 + rank)
        model_zoo.compile_classifier(model, keras.optimizers.SGD(0.1, momentum=0.5))
    names = [v.value.name for v in model.variables]
    parallel = replicate.replicate(model, backend=backend)
    x, y = global_data()
    xr, yr = rank_batches(x, rank, size), rank_batches(y, rank, size)
    history = parallel.fit(
        xr, yr, batch_size=GLOBAL_BATCH // size, epochs=2, shuffle=False, verbose=0
    )
    np.savez(out / f"names_{case}_rank{rank}.npz", *model.get_weights())
    return {"names": names, "loss": history.history["loss"]}


def steps_case(out, backend, kind, epochs=2):
    """steps_per_epoch=5 over 2 epochs with 10 batches on rank 0 and 6 on rank 1 (over 3
    epochs a generator runs out everywhere)."""
    rank = backend.rank
    (x, y), (xv, yv) = short_shards(rank)
    model = model_zoo.mlp(seed=21)
    parallel = replicate.replicate(model, backend=backend)
    model_zoo.compile_classifier(parallel, keras.optimizers.SGD(0.1, momentum=0.5))
    val = tf.data.Dataset.from_tensor_slices((xv, yv)).batch(STEPS_BATCH)
    if kind == "dataset":
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(STEPS_BATCH)
    elif kind == "generator_ran_out":
        data, epochs = ((x[i : i + 7], y[i : i + 7]) for i in range(0, len(x), 7)), 3
    else:
        data = (
            (x[i : i + STEPS_BATCH], y[i : i + STEPS_BATCH]) for i in range(0, len(x), STEPS_BATCH)
        )
    history = parallel.fit(
        data, epochs=epochs, steps_per_epoch=5, validation_data=val, validation_steps=3, verbose=0
    )
    np.savez(out / f"steps_{kind}_rank{rank}.npz", *model.get_weights())
    return {"history": history.history, "iterations": int(parallel.optimizer.iterations)}


class StopAfterBatch(keras.callbacks.Callback):
    """Rank 1 sets stop_training after step 3 of epoch 1 (a batch-end hook)."""

    def __init__(self, rank):
        super().__init__()
        self.rank, self.epoch = rank, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.rank == 1 and self.epoch == 0 and batch == 2:
            self.model.stop_training = True


class StopBeforeBatch(StopAfterBatch):
    """Rank 1 sets stop_training before step 3 of epoch 1 (only a batch-begin hook)."""

    on_train_batch_end = keras.callbacks.Callback.on_train_batch_end

    def on_train_batch_begin(self, batch, logs=None):
        if self.rank == 1 and self.epoch == 0 and batch == 2:
            self.model.stop_training = True


class StopAtEpochEnd(keras.callbacks.Callback):
    """Rank 0 sets stop_training at the end of epoch 2 (no batch hook at all)."""

    def __init__(self, rank):
        super().__init__()
        self.rank = rank

    def on_epoch_end(self, epoch, logs=None):
        if self.rank == 0 and epoch == 1:
            self.model.stop_training = True


def stop_case(out, backend, where):
    rank, size = backend.rank, backend.size
    model = model_zoo.mlp(seed=31)
    parallel = replicate.replicate(model, backend=backend)
    model_zoo.compile_classifier(parallel)
    x, y = global_data()  # 5 global batches per epoch
    xr, yr = rank_batches(x, rank, size), rank_batches(y, rank, size)
    stop = {"batch": StopAfterBatch, "begin": StopBeforeBatch, "epoch": StopAtEpochEnd}[where]
    stop = stop(rank)
    history = parallel.fit(
        xr,
        yr,
        batch_size=GLOBAL_BATCH // size,
        epochs=4,
        shuffle=False,
        verbose=0,
        callbacks=[stop],
    )
    np.savez(out / f"stop_{where}_rank{rank}.npz", *model.get_weights())
    steps = int(parallel.optimizer.iterations)
    return {"epochs": len(history.history["loss"]), "iterations": steps}


def written_case(out, backend):
    """export_saved_model and save on every process: the chief writes, the others wait."""
    from replicate.export import export_saved_model

    inputs = keras.Input((6,), name="features")
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="probs")(inputs))
    parallel = replicate.replicate(model, backend=backend)
    model_zoo.compile_classifier(parallel)
    x, y = global_data(28)
    parallel.fit(x, y, batch_size=7, epochs=1, verbose=0)
    base = out / "serving"
    found = {"paths": [], "listed": [], "pb_ctime": []}
    for _ in range(2):
        path = export_saved_model(parallel, base)
        found["paths"].append(path)
        found["listed"].append(sorted(os.listdir(base)))  # complete when the call returns
        found["pb_ctime"].append(os.stat(Path(path) / "saved_model.pb").st_ctime_ns)
    parallel.save(out / "model.keras")
    found["saved_seen"] = (out / "model.keras").exists()
    try:  # version 1 exists: the chief's export fails, and every process says so
        export_saved_model(parallel, base, version=1)
    except Exception as error:
        found["failed"] = f"{type(error).__name__}: {error}"
    return found


def shuffle_case(backend):
    """Rank-seeded shuffles: before the shard (refused), after it (disjoint shards)."""
    numbers = tf.data.Dataset.range(64)
    try:
        replicate.shard(numbers.shuffle(64))
        refused = None
    except ValueError as error:
        refused = str(error)
    mine = replicate.shard(numbers).shuffle(64)
    return {"refused": refused, "elements": [int(v) for v in mine.as_numpy_iterator()]}


def agree(out, backend):
    results = {}
    for case in ("loaded", "extra", "synchronized"):
        results[f"names_{case}"] = names_case(out, backend, case)
    for kind in ("dataset", "generator", "generator_ran_out"):
        results[f"steps_{kind}"] = steps_case(out, backend, kind)
    for where in ("batch", "begin", "epoch"):
        results[f"stop_{where}"] = stop_case(out, backend, where)
    results["written"] = written_case(out, backend)
    results["shuffle"] = shuffle_case(backend)
    results["sparse"] = {o: sparse_case(backend, o) for o in ("adam", "sgd")}
    (out / f"agree_rank{backend.rank}.json").write_text(json.dumps(results))


def sparse_case(backend, optimizer):
    """An embedding's sparse gradient across processes: what the step warns (if anything)."""
    keras.utils.set_random_seed(2)
    tokens = keras.Input((5,), dtype="int32")
    pooled = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(6, 4, name="ids")(tokens))
    model = keras.Model(tokens, keras.layers.Dense(1)(pooled))
    parallel = replicate.replicate(model, backend=backend, check=False)
    parallel.compile(optimizer=optimizer, loss="mse")
    x = np.random.default_rng(backend.rank).integers(0, 6, size=(16, 5)).astype("int32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parallel.fit(x, np.zeros((16, 1), "float32"), batch_size=8, epochs=1, verbose=0)
    return [str(w.message) for w in caught if str(w.message).startswith("replicate")]


def disagree(out, backend):
    """Each case puts the processes at different points; every process records its error."""
    rank = backend.rank
    x, y = global_data(28)

    def parallel_mlp(hidden=16):
        keras.utils.set_random_seed(41)
        layers = [keras.Input((6,)), keras.layers.Dense(hidden, name="hidden")]
        model = keras.Sequential([*layers, keras.layers.Dense(3, name="out")], name="mlp")
        parallel = replicate.replicate(model, backend=backend)
        model_zoo.compile_classifier(parallel)
        return parallel

    def epochs(p):  # rank 0 trains 3 epochs, rank 1 2, then evaluates
        p.fit(x, y, batch_size=7, epochs=3 if rank == 0 else 2, verbose=0)
        p.evaluate(x, y, verbose=0)

    def evaluate_or_save(p):
        p.fit(x, y, batch_size=7, epochs=1, verbose=0)
        if rank == 0:
            p.evaluate(x, y, verbose=0)
        else:
            p.save(out / "never.keras")

    def chief_evaluates(p):  # the `if rank == 0:` habit, then fit on every process
        if rank == 0:
            p.evaluate(x, y, verbose=0)
        p.fit(x, y, batch_size=7, epochs=1, verbose=0)

    def models(_):
        p = parallel_mlp(hidden=16 if rank == 0 else 8)
        p.fit(x, y, batch_size=7, epochs=1, verbose=0)

    results = {}
    for name, case in [
        ("epochs", epochs),
        ("evaluate_or_save", evaluate_or_save),
        ("chief_evaluates", chief_evaluates),
        ("models", models),
    ]:
        parallel = parallel_mlp()
        start = time.monotonic()
        try:
            case(parallel)
            error = None
        except Exception as raised:
            error = f"{type(raised).__name__}: {raised}"
            traceback.print_exc()
        results[name] = {"error": error, "seconds": time.monotonic() - start}
    (out / f"disagree_rank{rank}.json").write_text(json.dumps(results))


class SlowToSave(keras.layers.Layer):
    """Passes its input through; writing its (empty) state takes `seconds`: a large model
    on slow storage."""

    seconds = 0.0

    def call(self, x):
        return x

    def save_own_variables(self, store):
        time.sleep(SlowToSave.seconds)
        super().save_own_variables(store)


def slow(out, backend):
    rank, size = backend.rank, backend.size
    SlowToSave.seconds = float(os.environ["SLOW_SAVE"])
    keras.utils.set_random_seed(51)
    layers = [keras.Input((6,)), keras.layers.Dense(8), SlowToSave(), keras.layers.Dense(3)]
    parallel = replicate.replicate(keras.Sequential(layers), backend=backend)
    model_zoo.compile_classifier(parallel)
    x, y = global_data(56)  # 4 steps of 7 per process
    xr, yr = rank_batches(x, rank, size), rank_batches(y, rank, size)
    callbacks = [keras.callbacks.ModelCheckpoint(out / "every3.keras", save_freq=3)]
    start = time.monotonic()
    parallel.fit(xr, yr, batch_size=7, epochs=1, verbose=0, callbacks=callbacks)
    parallel.save(out / "after.keras")
    seconds = time.monotonic() - start
    (out / f"slow_rank{rank}.json").write_text(json.dumps({"seconds": seconds}))


def main():
    name, scenario, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    replicate.simulate_devices(2)
    backend = replicate.get_backend(name)  # the collective runtime: before TensorFlow starts
    keras.utils.set_random_seed(backend.rank)
    if scenario == "train":
        train(out, backend)
    elif scenario == "fault":
        fault(out, backend, sys.argv[4])
    elif scenario == "resume":
        resume(out, backend, sys.argv[4])
    elif scenario == "consistency":
        consistency(out, backend)
    elif scenario == "chief":
        chief_only(out, backend)
    elif scenario == "agree":
        agree(out, backend)
    elif scenario == "disagree":
        disagree(out, backend)
    elif scenario == "slow":
        slow(out, backend)
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")


if __name__ == "__main__":
    main()
