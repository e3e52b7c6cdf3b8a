"""Every private Keras and TensorFlow name replicate uses, behind one seam.

Keras and TensorFlow rename their internals without notice. Each accessor (in
`keras_internals` and `tensorflow_internals`, re-exported here) is the only
place where replicate touches one, names the versions it was checked on, and
`verify()` (run by `tests/test_keras_compat.py`) fails loudly, naming the
installed versions, when one of them is missing. No other module of replicate
reads a private Keras or TensorFlow name (`tests/test_house.py` checks that).

Checked on both ends of the supported range: Keras 3.2.0 with TensorFlow 2.16.1
(`requirements/oldest.txt`, `make test-compat`) and Keras 3.15.1 with
TensorFlow 2.21.0; the fallbacks in the docstrings cover the releases between.
"""

from __future__ import annotations

import importlib

import keras
import tensorflow as tf

from replicate._keras_compat.keras_internals import (
    KERAS_VERSION,
    LOGITS,
    MASK,
    _global_state,
    any_batch_size,
    compiled_loss,
    compiled_unbuilt,
    compute_loss,
    get_global_attribute,
    get_logits,
    get_mask,
    get_tensor_attribute,
    is_variable,
    loss_tracker,
    optimizer_variables,
    route_masked_moments,
    set_global_attribute,
    set_initial_epoch,
    set_logits,
    set_mask,
    set_tensor_attribute,
    sublayers,
    symbolic_build,
)
from replicate._keras_compat.tensorflow_internals import (
    _NATIVE_HYPERPARAMETERS,
    _eager_context,
    abort_collectives,
    all_reduce,
    check_peer_health,
    configure_collectives,
    dataset_inputs,
    enable_collectives,
    is_control_flow_graph,
    native_hyperparameters,
    pass_through_autograph,
    set_variable_creators,
    shuffled_upstream,
    variable_creators,
)

__all__ = [
    "KERAS_VERSION",
    "LOGITS",
    "MASK",
    "abort_collectives",
    "all_reduce",
    "any_batch_size",
    "check_peer_health",
    "compiled_loss",
    "compiled_unbuilt",
    "compute_loss",
    "configure_collectives",
    "dataset_inputs",
    "enable_collectives",
    "get_global_attribute",
    "get_logits",
    "get_mask",
    "get_tensor_attribute",
    "is_control_flow_graph",
    "is_variable",
    "loss_tracker",
    "native_hyperparameters",
    "optimizer_variables",
    "pass_through_autograph",
    "route_masked_moments",
    "set_global_attribute",
    "set_initial_epoch",
    "set_logits",
    "set_mask",
    "set_tensor_attribute",
    "set_variable_creators",
    "shuffled_upstream",
    "sublayers",
    "symbolic_build",
    "variable_creators",
    "verify",
]


# -- the check ------------------------------------------------------------------


def _probe_model() -> keras.Model:
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    model.compile(optimizer="sgd", loss="mse")
    return model


def _built_batch_norm() -> keras.layers.BatchNormalization:
    layer = keras.layers.BatchNormalization()
    layer.build((None, 2))
    return layer


def _probe_metrics() -> bool:
    model = _probe_model()
    model.compile(optimizer="sgd", loss="mse", metrics=["mae"])
    if not compiled_unbuilt(model):  # the attributes it reads are gone
        raise AttributeError("`_compile_metrics` or its `built` flag")
    return True


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
    rnn = keras.layers.SimpleRNN(1, stateful=True)
    rnn.build((2, 1, 1))
    checks = [
        # Keras < 3.12 has no batch-size check to relax (`any_batch_size`).
        ("RNN._expected_batch_size", lambda: KERAS_VERSION < (3, 12) or rnn._expected_batch_size),
        ("Variable._shape", lambda: rnn.states[0]._shape),
        ("keras global_state", lambda: _global_state().get_global_attribute),
        ("backend.common.KerasVariable", lambda: is_variable(rnn)),
        ("Model._compile_loss", lambda: model._compile_loss),
        ("Trainer._symbolic_build", lambda: model._symbolic_build),
        ("Trainer._compile_metrics.built", _probe_metrics),
        ("Model._loss_tracker", lambda: model._loss_tracker),
        ("Layer._losses_override", lambda: model._losses_override),
        ("Layer._flatten_layers", lambda: model._flatten_layers),
        ("BatchNormalization._moments", lambda: keras.layers.BatchNormalization._moments),
        ("BatchNormalization._reduction_axes", lambda: _built_batch_norm()._reduction_axes),
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
        ("control_flow_v2_func_graphs", lambda: is_control_flow_graph(graph) is False),
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
                "Keras 3.2.0 with TensorFlow 2.16.1 and Keras 3.15.1 with TensorFlow 2.21.0; "
                "install a supported pair (see the README's Stack line)."
            ) from error
    return [name for name, _ in checks]
