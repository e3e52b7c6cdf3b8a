"""Every private Keras and TensorFlow name replicate uses, in one place.

Keras and TensorFlow rename their internals without notice. Each accessor
below is the only place where replicate touches one, names the versions it
was checked on, and `verify()` (run by `tests/test_keras_compat.py`) fails
loudly, naming the installed versions, when one of them is missing. No other
module of replicate reads a private Keras or TensorFlow name
(`tests/test_house.py` checks that).

Checked on: Keras 3.15.1 with TensorFlow 2.21.0 (the project's pinned
stack); the fallbacks named in each docstring cover older Keras 3 releases.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from typing import Any

import keras
import tensorflow as tf

# -- tensor attributes: Keras masks and the logits behind an activation -------


def _tensor_attributes() -> Any:
    try:
        return importlib.import_module("keras.src.backend.common.tensor_attributes")
    except ImportError:  # Keras < 3.6 set the attributes directly
        return None


_ATTRIBUTES = _tensor_attributes()


def get_tensor_attribute(tensor: Any, name: str) -> Any:
    """A Keras attribute of a tensor (`_keras_mask`, `_keras_logits`), or `None`.

    Keras keeps masks and the logits behind a sigmoid or softmax output as
    attributes of the output tensor (`keras.src.backend.common.
    tensor_attributes`, Keras >= 3.6; a plain attribute before).
    """
    if _ATTRIBUTES is not None:
        return _ATTRIBUTES.get_tensor_attr(tensor, name)
    return getattr(tensor, name, None)


def set_tensor_attribute(tensor: Any, name: str, value: Any) -> None:
    """Sets a Keras attribute of a tensor (see `get_tensor_attribute`)."""
    if _ATTRIBUTES is not None:
        _ATTRIBUTES.set_tensor_attr(tensor, name, value)
        return
    try:
        setattr(tensor, name, value)
    except AttributeError:
        pass


MASK = "_keras_mask"
LOGITS = "_keras_logits"


def get_mask(tensor: Any) -> Any:
    """The Keras mask of `tensor`, or `None` (Keras 3.0-3.15: `_keras_mask`)."""
    return get_tensor_attribute(tensor, MASK)


def set_mask(tensor: Any, mask: Any) -> None:
    """Sets the Keras mask of `tensor` (`None` clears it)."""
    set_tensor_attribute(tensor, MASK, mask)


def get_logits(tensor: Any) -> Any:
    """The logits Keras keeps behind a sigmoid or softmax output, or `None`.

    Keras 3.0-3.15 attach them as `_keras_logits` (`keras.activations.sigmoid`,
    `softmax`, `keras.ops.sigmoid`), and its crossentropies read them instead
    of the clipped probabilities.
    """
    return get_tensor_attribute(tensor, LOGITS)


def set_logits(tensor: Any, logits: Any) -> None:
    """Attaches `logits` to an output tensor, as Keras' activations do."""
    set_tensor_attribute(tensor, LOGITS, logits)


# -- Keras' per-thread global state -------------------------------------------


def _global_state() -> Any:
    return importlib.import_module("keras.src.backend.common.global_state")


def get_global_attribute(name: str) -> Any:
    """A Keras global (per-thread) attribute: dtype policy, seed generator, random seed.

    `keras.src.backend.common.global_state`, Keras 3.0-3.15.
    """
    return _global_state().get_global_attribute(name)


def set_global_attribute(name: str, value: Any) -> None:
    """Sets a Keras global (per-thread) attribute (see `get_global_attribute`)."""
    _global_state().set_global_attribute(name, value)


# -- the trainer's loss -------------------------------------------------------


def compiled_loss(model: keras.Model) -> Any:
    """The model's compiled loss, or `None` (`Trainer._compile_loss`, Keras 3.0-3.15)."""
    return getattr(model, "_compile_loss", None)


def loss_tracker(model: keras.Model) -> keras.metrics.Mean:
    """The `Mean` behind the `loss` Keras shows (`Trainer._loss_tracker`, Keras 3.0-3.15)."""
    return model._loss_tracker


def compute_loss(
    model: keras.Model,
    *,
    x: Any,
    y: Any,
    y_pred: Any,
    sample_weight: Any,
    training: bool,
    losses: Sequence[Any],
) -> Any:
    """The model's `compute_loss`, with `model.losses` reading `losses`.

    Keras reads `model.losses` inside `compute_loss`; replicate computes the
    model's own losses over the towers and hands them in through
    `Layer._losses_override` (Keras 3.0-3.15). `Trainer._compute_loss` (Keras
    >= 3.3) passes `training` only to overrides that accept it.
    """
    model._losses_override = list(losses)
    try:
        wrapper = getattr(model, "_compute_loss", None)
        if wrapper is not None:
            return wrapper(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training)
        return model.compute_loss(x, y, y_pred, sample_weight)
    finally:
        model._losses_override = []


# -- layers, optimizers, fit --------------------------------------------------


def sublayers(model: keras.Layer) -> Iterator[keras.Layer]:
    """Every layer inside `model`, nested ones too (`Layer._flatten_layers`, Keras 3.0-3.15)."""
    return model._flatten_layers(include_self=False)


def optimizer_variables(optimizer: keras.optimizers.Optimizer) -> list[Any]:
    """The variables an optimizer was built for (`_trainable_variables`, Keras 3.0-3.15)."""
    return list(optimizer._trainable_variables)


def set_initial_epoch(model: keras.Model, epoch: int | None) -> None:
    """Makes the next `fit` start at `epoch` (what Keras' `BackupAndRestore` sets:
    `Trainer._initial_epoch`, Keras 3.0-3.15); `None` clears it."""
    model._initial_epoch = epoch


# -- TensorFlow graphs and native optimizers ----------------------------------


def variable_creators(graph: tf.Graph) -> Any:
    """The variable creators `tf.function` installs per thread on a graph being traced
    (`Graph._variable_creator_stack`, TensorFlow 2.16-2.21)."""
    return graph._variable_creator_stack


def set_variable_creators(graph: tf.Graph, creators: Any) -> None:
    """Installs `variable_creators(graph)` of another thread on this thread."""
    graph._variable_creator_stack = creators


_NATIVE_HYPERPARAMETERS = {
    "AdamOptimizer": {
        "learning_rate": "_lr",
        "beta_1": "_beta1",
        "beta_2": "_beta2",
        "epsilon": "_epsilon",
    },
    "MomentumOptimizer": {
        "learning_rate": "_learning_rate",
        "momentum": "_momentum",
        "nesterov": "_use_nesterov",
    },
    "RMSPropOptimizer": {
        "learning_rate": "_learning_rate",
        "rho": "_decay",
        "momentum": "_momentum",
        "epsilon": "_epsilon",
        "centered": "_centered",
    },
    "AdagradOptimizer": {
        "learning_rate": "_learning_rate",
        "initial_accumulator_value": "_initial_accumulator_value",
    },
    "GradientDescentOptimizer": {"learning_rate": "_learning_rate"},
}


def native_hyperparameters(optimizer: Any, kind: str) -> dict[str, Any]:
    """The hyperparameters a `tf.compat.v1.train` optimizer was made with.

    They are private attributes (`_lr`, `_beta1`, ...; TensorFlow 2.16-2.21).

    Args:
        optimizer: The native optimizer.
        kind: Its class name, a key of the table above.
    """
    return {key: getattr(optimizer, name) for key, name in _NATIVE_HYPERPARAMETERS[kind].items()}


# -- TensorFlow's collective runtime ------------------------------------------


def _eager_context() -> Any:
    return importlib.import_module("tensorflow.python.eager.context").context()


def configure_collectives(*, leader: str, task: tuple[str, int]) -> None:
    """Configures the collective runtime of this process (before TensorFlow starts).

    `context.configure_collective_ops` (TensorFlow 2.16-2.21), as
    `MultiWorkerMirroredStrategy` does.

    Raises:
        RuntimeError: If TensorFlow has already started.
    """
    job, index = task
    _eager_context().configure_collective_ops(
        collective_leader=leader,
        scoped_allocator_enabled_ops=("CollectiveReduce",),
        device_filters=(f"/job:{job}/task:{index}",),
    )


def enable_collectives(jobs: dict[str, list[str]], task: tuple[str, int]) -> None:
    """Starts this task's gRPC server and enables collectives across the cluster
    (`context.enable_collective_ops`, TensorFlow 2.16-2.21)."""
    ctx = _eager_context()
    job, index = task
    server_def = tf.train.ServerDef(
        cluster=tf.train.ClusterSpec(jobs).as_cluster_def(),
        job_name=job,
        task_index=index,
        protocol="grpc",
        default_session_config=ctx.config,
    )
    ctx.enable_collective_ops(server_def)


def all_reduce(
    tensor: tf.Tensor,
    *,
    group_size: int,
    group_key: int,
    instance_key: int,
    merge_op: str,
    communication_hint: str,
    timeout: float,
) -> tf.Tensor:
    """One collective all-reduce (`collective_ops.all_reduce_v2`, TensorFlow 2.16-2.21)."""
    collective_ops = importlib.import_module("tensorflow.python.ops.collective_ops")
    return collective_ops.all_reduce_v2(
        tensor,
        group_size=group_size,
        group_key=group_key,
        instance_key=instance_key,
        merge_op=merge_op,
        final_op="Id",
        communication_hint=communication_hint,
        timeout=timeout,
    )


def check_peer_health(task: str, timeout_in_ms: int) -> None:
    """Raises if the collective peer `task` does not answer
    (`context.check_collective_ops_peer_health`, TensorFlow 2.16-2.21)."""
    _eager_context().check_collective_ops_peer_health(task, timeout_in_ms=timeout_in_ms)


def abort_collectives(code: int, message: str) -> None:
    """Fails every pending and later collective of this process with `message`
    (`context.abort_collective_ops`, TensorFlow 2.16-2.21)."""
    _eager_context().abort_collective_ops(code, message)


# -- tf.data pipelines -------------------------------------------------------------


def dataset_inputs(dataset: tf.data.Dataset) -> list[tf.data.Dataset]:
    """The datasets `dataset` is made from (`DatasetV2._inputs()`, TensorFlow 2.16-2.21)."""
    return list(dataset._inputs())


def shuffled_upstream(dataset: tf.data.Dataset) -> str | None:
    """The class of a shuffle anywhere upstream of `dataset` (itself included), or None.

    `Dataset.shuffle` and `Dataset.list_files(shuffle=True)` make a
    `_ShuffleDataset` (`tensorflow/python/data/ops/shuffle_op.py`, TensorFlow
    2.16-2.21); the deprecated `shuffle_and_repeat` a `_ShuffleAndRepeatDataset`.
    Datasets made inside a function (`interleave`, `flat_map`) are not seen.
    """
    stack, seen = [dataset], set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        name = type(current).__name__
        if "Shuffle" in name:
            return name
        stack.extend(dataset_inputs(current))
    return None


# -- the check ------------------------------------------------------------------


def _probe_model() -> keras.Model:
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    model.compile(optimizer="sgd", loss="mse")
    return model


def verify() -> list[str]:
    """Checks that every internal above exists in the installed Keras and TensorFlow.

    Returns:
        The names checked, in order.

    Raises:
        RuntimeError: Naming the missing internal and the installed Keras and
            TensorFlow versions.
    """
    model = _probe_model()
    optimizer = model.optimizer
    optimizer.build(model.trainable_variables)
    graph = tf.Graph()
    checks = [
        ("keras global_state", lambda: _global_state().get_global_attribute),
        ("Model._compile_loss", lambda: model._compile_loss),
        ("Model._loss_tracker", lambda: model._loss_tracker),
        ("Layer._losses_override", lambda: model._losses_override),
        ("Layer._flatten_layers", lambda: model._flatten_layers),
        ("Trainer._initial_epoch", lambda: model._initial_epoch),
        ("Optimizer._trainable_variables", lambda: optimizer._trainable_variables),
        ("Graph._variable_creator_stack", lambda: graph._variable_creator_stack),
        ("context.configure_collective_ops", lambda: _eager_context().configure_collective_ops),
        ("context.enable_collective_ops", lambda: _eager_context().enable_collective_ops),
        ("context.abort_collective_ops", lambda: _eager_context().abort_collective_ops),
        (
            "context.check_collective_ops_peer_health",
            lambda: _eager_context().check_collective_ops_peer_health,
        ),
        ("DatasetV2._inputs", lambda: tf.data.Dataset.range(1)._inputs),
        # None (no shuffle recognised) has no `.lower`: an AttributeError, as a missing name.
        ("_ShuffleDataset", lambda: shuffled_upstream(tf.data.Dataset.range(2).shuffle(2)).lower),
        (
            "collective_ops.all_reduce_v2",
            lambda: importlib.import_module("tensorflow.python.ops.collective_ops").all_reduce_v2,
        ),
    ]
    for kind, names in _NATIVE_HYPERPARAMETERS.items():
        native = getattr(tf.compat.v1.train, kind)(
            0.1, **({"momentum": 0.9} if "Mom" in kind else {})
        )
        for name in names.values():
            checks.append(
                (f"tf.compat.v1.train.{kind}.{name}", lambda n=native, a=name: getattr(n, a))
            )
    for name, read in checks:
        try:
            read()
        except (AttributeError, ImportError) as error:
            raise RuntimeError(
                f"replicate needs the internal `{name}`, which Keras {keras.__version__} with "
                f"TensorFlow {tf.__version__} does not have ({error}). replicate was checked on "
                "Keras 3.15.1 and TensorFlow 2.21.0; install a supported pair "
                "(see the README's Stack line)."
            ) from error
    return [name for name, _ in checks]
