"""TensorFlow internals replicate reads: AutoGraph's errors, graphs being traced, native
optimizers, the collective runtime (see `replicate._keras_compat`)."""

from __future__ import annotations

import importlib
from typing import Any

import tensorflow as tf


def pass_through_autograph(error: BaseException) -> None:
    """Lets `error` leave the `tf.function`s around it as it is, notes included.

    AutoGraph replaces an error raised inside a converted function with a copy
    that names the user's code (`ag_error_metadata`), and an error marked
    `ag_pass_through` is left alone (TensorFlow 2.16-2.21). The error has
    already been told where it came from (`replicate.tower_errors`).
    """
    if hasattr(error, "ag_error_metadata"):
        del error.ag_error_metadata
    error.ag_pass_through = True


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
    """The class name of a shuffle anywhere upstream of `dataset` (itself included), or None.

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


def is_control_flow_graph(graph: Any) -> bool:
    """Whether `graph` is a branch of `tf.cond`/`tf.switch_case` or a part of a
    `tf.while_loop` (`control_flow_v2_func_graphs`, TensorFlow 2.16-2.21)."""
    graphs = importlib.import_module("tensorflow.python.ops.control_flow_v2_func_graphs")
    kinds = (graphs.CondBranchFuncGraph, graphs.WhileCondFuncGraph, graphs.WhileBodyFuncGraph)
    return isinstance(graph, kinds)
