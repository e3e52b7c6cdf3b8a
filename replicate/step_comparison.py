"""A model's own `train_step`, compared: run on one device and on the towers from the same
start, with plain SGD in place of its optimizers; everything is put back after
(`replicate.check`).

The step is opaque, so what it hands to `optimizer.apply` is seen as each
weight's change. Under SGD that change is the learning rate times the gradient,
so the towers' changes are compared as the plain path compares gradients: a
change that is zero in exact arithmetic is rounding noise, measured against 1% of
the largest change. Adam, RMSprop and the like would normalize such noise into
steps of the learning rate's size, on one device too, and call it a difference.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from replicate import steps
from replicate.backends import LocalBackend
from replicate.builder import ReplicaBuilder
from replicate.tower import is_seed_state


def relative_difference(a: Any, b: Any, floor: float = 1e-12) -> float:
    """max |a - b| / max |b|, with `floor` as the least denominator (a quantity that is
    zero in exact arithmetic is rounding noise, measured against its kind's scale)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), floor))


def noise_floor(values: Iterable[Any]) -> float:
    """The least denominator for a quantity of the kind `values` hold: 1% of their largest
    magnitude (a quantity zero in exact arithmetic is rounding noise of about that kind's
    scale), and never below 1e-12."""
    largest = max((float(np.max(np.abs(np.asarray(v)))) for v in values if np.size(v)), default=0.0)
    return max(1e-2 * largest, 1e-12)


def error_line(error: BaseException) -> str:
    """The line of an error message that says what went wrong (Keras' wrapper lines and
    terminal colours left out)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line and not line.startswith("Exception encountered")]
    return lines[0][:300] if lines else type(error).__name__


class _Twin:
    """What a model's own step needs of a replicated model, on one process: no collective."""

    def __init__(self, template: keras.Model, builder: ReplicaBuilder) -> None:
        self.template, self.builder = template, builder
        self.backend = LocalBackend()

    def share(self, count: tf.Tensor) -> None:
        return None

    def combined_results(self, metrics: list) -> list:
        return [m.result() for m in metrics]


def compare_step(
    report: Any,
    template: keras.Model,
    reference: ReplicaBuilder,
    towers: ReplicaBuilder,
    batch: Any,
) -> None:
    """Runs the model's own `train_step` on one device and on the towers, from the same
    start, with SGD in place of its optimizers; everything is put back after."""
    variables = list(template.variables) + [v for m in template.metrics for v in m.variables]
    saved = [v.numpy() for v in variables]
    start = {v.path: v.numpy() for v in template.trainable_variables}
    seeds = [v for v in template.non_trainable_variables if is_seed_state(v)]

    def run(builder):
        with _fresh_optimizers(template):
            logs = steps.TowerRun(_Twin(template, builder), batch)("train_step")
            drew = any(not np.array_equal(v.numpy(), saved[variables.index(v)]) for v in seeds)
            after = {v.path: v.numpy() - start[v.path] for v in template.trainable_variables}
        for variable, value in zip(variables, saved):
            variable.assign(value)
        flat = {f"step result {k}": v for k, v in _flat_logs(logs).items()}
        return flat, after, drew

    side = "one device"
    try:
        one, one_weights, drew = run(reference)
        if not drew:
            # Random numbers outside Keras' seeds (`tf.random.normal`, NumPy) change no
            # variable: the same step run twice on one device from the same start differs.
            again, again_weights, _ = run(reference)
            drew = _differ(again, one) or _differ(again_weights, one_weights)
        side = "the towers"
        many, many_weights, _ = run(towers)
    except Exception as error:
        what = f"{type(error).__name__}: {error_line(error)}"
        if side == "one device" and not isinstance(error, steps.UnseededRandom):
            report.notes.append(f"the model's own train_step could not be compared ({what})")
        else:  # fit would fail the same way
            report.causes.append(f"the model's own train_step fails through the towers ({what})")
        for variable, value in zip(variables, saved):
            variable.assign(value)
        return
    if drew:
        report.notes.append(
            "the model's own train_step draws random numbers (its noise differs per tower by "
            "design; seen as a Keras seed that moved, or as two runs on one device from the "
            "same start that differ): its results were not compared, only its forward pass"
        )
        return
    for key in sorted(set(one) & set(many)):
        report.differences.append((key, relative_difference(many[key], one[key])))
    floor = noise_floor(one_weights.values())
    for path, value in one_weights.items():
        difference = relative_difference(many_weights[path], value, floor)
        report.differences.append((f"weight after the step {path}", difference))


class _fresh_optimizers:
    """Gives the model a fresh SGD, at each optimizer's current learning rate, in place of
    every optimizer it holds (an attribute), for the duration."""

    def __init__(self, template: keras.Model) -> None:
        self.template = template
        self.saved: list[tuple[str, Any]] = []

    def __enter__(self):
        for name, value in list(vars(self.template).items()):
            if isinstance(value, keras.optimizers.Optimizer):
                rate = float(tf.convert_to_tensor(value.learning_rate))
                copy = keras.optimizers.SGD(learning_rate=rate, name=value.name)
                self.saved.append((name, value))
                object.__setattr__(self.template, name, copy)
        return self

    def __exit__(self, *args):
        for name, value in self.saved:
            object.__setattr__(self.template, name, value)
        return False


def _differ(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two runs of the step on one device disagree beyond rounding (1e-6 of each
    quantity's scale): a step that draws its own random numbers."""
    floor = noise_floor(b.values())
    return any(relative_difference(a[k], b[k], floor) > 1e-6 for k in b if k in a)


def _flat_logs(logs: Any) -> dict[str, np.ndarray]:
    if isinstance(logs, dict):
        return {str(k): np.asarray(v) for k, v in logs.items() if tf.is_tensor(v) or np.isscalar(v)}
    return {str(i): np.asarray(v) for i, v in enumerate(tf.nest.flatten(logs)) if v is not None}
