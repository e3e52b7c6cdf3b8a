"""What a step reports: metric results and logs that cover every process's samples.

Across processes, each metric's state (totals and counts) is combined first
and the result is computed from the combined state: a loss averaged over 100
samples on one process and 90 on another is the mean over all 190. A step's
other floating-point scalars are averaged over every process's samples.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

# The key under which a step returns its agreement token with its logs; the
# replicated model's train and test functions take it out before Keras sees it.
TOKEN = "replicate_agreement_token"


def results_from_state(metrics: Sequence[keras.metrics.Metric], state: Sequence[Any]) -> list:
    """Each metric's result from `state`: its variables' values, metric after metric."""
    out, start = [], 0
    for metric in metrics:
        count = len(metric.variables)
        out.append(metric.stateless_result(list(state[start : start + count])))
        start += count
    return out


def combined_results(metrics: Sequence[keras.metrics.Metric], backend: Any) -> list[Any]:
    """Each metric's result over every process's samples (one collective for all).

    Works eagerly and inside a step.
    """
    if backend.size == 1:
        return [m.result() for m in metrics]
    variables = [v for m in metrics for v in m.variables]
    state = backend.reduce_state([v.value for v in variables], [v.aggregation for v in variables])
    return results_from_state(metrics, state)


def metrics_result(metrics: Sequence[keras.metrics.Metric], backend: Any) -> dict[str, Any]:
    """`Model.get_metrics_result()` over every process's samples: name -> result."""
    out: dict[str, Any] = {}
    for metric, result in zip(metrics, combined_results(metrics, backend)):
        if isinstance(result, dict):
            out.update(result)
        else:
            out[metric.name] = result
    if tf.executing_eagerly():
        out = {k: float(v) if np.ndim(v) == 0 else np.asarray(v) for k, v in out.items()}
    return out


def exchange(
    backend: Any,
    template: keras.Model,
    count: tf.Tensor,
    grads: Any,
    logs: Any,
    *,
    shares: bool = False,
) -> tuple[list[Any], Any]:
    """The step's one collective: gradients, and logs that cover every process.

    In the logs, a metric's result comes from the metrics' combined state;
    another floating-point scalar is averaged over every process's samples.

    Args:
        backend: The process backend.
        template: The model whose metrics the logs report.
        count: This process's samples in the step.
        grads: This process's gradients (see `Backend.exchange`).
        logs: What the step returns.
        shares: The gradients are already this process's share of the global one.

    Returns:
        `(grads, logs)`, both covering every process.
    """
    if backend.size == 1:
        return list(grads), logs
    warn_sparse(template, grads)
    metrics = template.metrics
    variables = [v for m in metrics for v in m.variables]
    keyed = logs if isinstance(logs, dict) else {}
    names = set(template.get_metrics_result()) if metrics else set()
    rest = [
        k
        for k, v in keyed.items()
        if k not in names and tf.is_tensor(v) and v.shape.rank == 0 and v.dtype.is_floating
    ]
    grads, state, means = backend.exchange(
        count,
        grads,
        [v.value for v in variables],
        [v.aggregation for v in variables],
        [keyed[k] for k in rest],
        shares=shares,
    )
    if not keyed:
        return grads, logs
    out = dict(keyed)
    received = backend.agreement.take_received()
    if received is not None:  # the step's agreement token, for `replicate.lockstep`
        out[TOKEN] = received
    for metric, result in zip(metrics, results_from_state(metrics, state)):
        items = result.items() if isinstance(result, dict) else [(metric.name, result)]
        out.update((k, v) for k, v in items if k in keyed)
    out.update(zip(rest, means))
    return grads, out


def warn_sparse(template: keras.Model, grads: Sequence[Any]) -> None:
    """Warns, while the step is traced, of sparse gradients summed densely across processes.

    Across processes every gradient travels dense, so rows of one index are
    added before the optimizer sees them. Keras' Adam, RMSprop and Adagrad
    square each row of a sparse (`IndexedSlices`) gradient first: where an
    id appears more than once in a global batch, their update differs from
    one device's. SGD (linear in the gradient) is exact.
    """
    optimizer = getattr(template, "optimizer", None)
    if optimizer is None or isinstance(optimizer, keras.optimizers.SGD):
        return
    names = [
        v.path
        for v, g in zip(template.trainable_variables, grads)
        if isinstance(g, tf.IndexedSlices)
    ]
    if names:
        warnings.warn(
            f"replicate: the gradients of {', '.join(f'`{n}`' for n in names)} are sparse "
            "(an embedding lookup) and are summed densely across processes, while "
            f"{type(optimizer).__name__} on one device squares each looked-up row on its own: "
            "where an id appears more than once in a global batch, those rows train "
            "differently from one device, the more so the more often ids repeat. SGD is exact; "
            "within one process the towers are.",
            stacklevel=2,
        )
