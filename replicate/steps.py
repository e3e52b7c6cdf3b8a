"""A model's own `train_step`, `test_step` and `predict_step`, run once per tower.

Each tower runs the model's step on its slice of the batch, on its device, in
a thread of its own (`replicate.replica`). Inside it:

- every `optimizer.apply(...)` / `apply_gradients(...)` of an optimizer the
  model holds is a meeting: the towers' gradients are averaged, weighted by
  slice size (then over processes, weighted by each process's samples),
  applied once on the variable device, and every tower continues with the
  updated weights, so a GAN's generator step sees the discriminator's new
  weights, as on one device;
- the model's state (non-trainable variables, metric variables) is
  tower-local: each tower's changes are captured (a Keras `StatelessScope`)
  and combined after the step by each variable's `aggregation`
  (`reduce.combine_state`): metric totals and counts add up, BatchNorm
  statistics are averaged by slice size;
- a metric updated with one scalar per step (`tracker.update_state(loss)`)
  counts each tower's value by its share of the batch, so the tracker holds
  the batch's mean as on one device; per-sample updates count every sample.

What the step returns is rebuilt from the combined state: a value that came
from a metric's `result()` is that metric's combined result; another scalar
is the towers' values weighted by slice size; anything else is tower 0's.

To make those calls meetings without changing the model's class, the
optimizers and metrics the model holds get an instance-level `apply`,
`update_state` and `result` while the towers run, removed afterwards; outside
a tower they behave exactly as before.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import keras
import tensorflow as tf

from replicate import _keras_compat, reduce
from replicate import merge as _merge
from replicate.replica import TowerContext, TowerGroup
from replicate.state import apply_gradients

STEPS = ("train_step", "test_step", "predict_step")


def overridden(model: keras.Model, name: str) -> bool:
    """Whether `model`'s class defines its own `name` (a step, `compute_loss`, ...)."""
    return getattr(type(model), name) is not getattr(keras.Model, name)


def optimizers(model: keras.Model) -> list[keras.optimizers.Optimizer]:
    """The Keras optimizers the model holds: `optimizer` and any attribute that is one."""
    found: dict[int, keras.optimizers.Optimizer] = {}

    def visit(value):
        if isinstance(value, keras.optimizers.Optimizer):
            found.setdefault(id(value), value)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)

    visit(getattr(model, "optimizer", None))
    for value in vars(model).values():
        visit(value)
    return list(found.values())


def _accepts_sample_weight(method: Any) -> bool:
    params = inspect.signature(method).parameters
    return "sample_weight" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    )


class _Routing:
    """Routes the model's optimizer and metric calls through the tower context."""

    def __init__(self, run: TowerRun) -> None:
        self.run = run
        self.results: dict[int, tuple[keras.metrics.Metric, int]] = {}
        self._installed: list[tuple[Any, str]] = []

    def _context(self) -> TowerContext | None:
        context = tf.distribute.get_replica_context()
        if isinstance(context, TowerContext) and context.group is self.run.group:
            return context
        return None

    def _install(self, target: Any, name: str, method: Any) -> None:
        if name in vars(target):
            raise RuntimeError(
                f"{target!r} already has its own `{name}`; replicate cannot route it."
            )
        object.__setattr__(target, name, method)
        self._installed.append((target, name))

    @contextlib.contextmanager
    def installed(self):
        try:
            for optimizer in optimizers(self.run.model):
                self._install(optimizer, "apply", self._apply_for(optimizer))
            for metric in self.run.model.metrics:
                self._install(metric, "update_state", self._update_for(metric))
                self._install(metric, "result", self._result_for(metric))
            yield self
        finally:
            for target, name in reversed(self._installed):
                object.__delattr__(target, name)
            self._installed.clear()

    def _apply_for(self, optimizer: keras.optimizers.Optimizer):
        original = type(optimizer).apply.__get__(optimizer)

        def apply(grads, trainable_variables=None):
            context = self._context()
            if context is None:
                return original(grads, trainable_variables)
            variables = (
                list(trainable_variables)
                if trainable_variables is not None
                else _keras_compat.optimizer_variables(optimizer)
            )
            return context.meet(
                f"{optimizer.name}.apply",
                list(grads),
                lambda per_tower: self.run.apply(optimizer, per_tower, variables),
            )

        return apply

    def _update_for(self, metric: keras.metrics.Metric):
        original = type(metric).update_state.__get__(metric)
        weighs = _accepts_sample_weight(original)

        def update_state(*args, **kwargs):
            context = self._context()
            if (
                context is not None
                and weighs
                and len(args) == 1
                and kwargs.get("sample_weight") is None
                and tf.convert_to_tensor(args[0]).shape.rank == 0
            ):
                # One value per step: this tower's part is its share of the
                # global batch (every process's towers together count once).
                kwargs["sample_weight"] = self.run.omega[context.index]
            return original(*args, **kwargs)

        return update_state

    def _result_for(self, metric: keras.metrics.Metric):
        original = type(metric).result.__get__(metric)

        def result():
            value = original()
            context = self._context()
            if context is not None and context.index == 0:
                for position, leaf in enumerate(tf.nest.flatten(value)):
                    self.results[id(leaf)] = (metric, position)
            return value

        return result


class TowerRun:
    """One call of a model's own step over the towers of a `ReplicatedModel`."""

    def __init__(self, parallel: Any, data: Any, *, collective: bool = True) -> None:
        self.parallel = parallel
        self.model = parallel.template
        self.builder = parallel.builder
        self.backend = parallel.backend
        self.slices = self.builder.slices(data)
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        with tf.device(self.builder.variable_device):
            self.count = reduce.batch_size(x)
            # Prediction talks to no other process; training and evaluation do.
            self.share = parallel.share(self.count) if collective else None
            weights = self.slices.weights
            self.omega = weights if self.share is None else weights * self.share
        self.group: TowerGroup = self.builder.group(
            self.slices, threaded=True, gradient_weights=self.omega
        )

    # -- the meeting at optimizer.apply --------------------------------------

    def apply(self, optimizer: Any, per_tower: list[list[Any]], variables: list[Any]) -> list:
        # Each tower's gradient weighted by its share of the global batch,
        # summed over towers and processes: the global batch's mean gradient.
        grads = self.backend.sum_gradients(reduce.weighted_sum(per_tower, self.omega))
        apply_gradients(optimizer, grads, variables, device=self.builder.variable_device)
        return [None] * len(per_tower)

    # -- the step ----------------------------------------------------------------

    def __call__(self, step: str) -> Any:
        model = self.model
        state_variables = list(model.non_trainable_variables)
        with tf.device(self.builder.variable_device):
            state = [tf.convert_to_tensor(v.value) for v in state_variables]
        method = getattr(model, step)

        def tower(i):
            mapping = list(zip(state_variables, self.builder.tower_state(i, state)))
            with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope:
                initial = {id(v): scope.get_current_value(v) for v in state_variables}
                result = method(self.slices.parts[i])
            _refuse_unseeded(scope)
            return result, scope, initial

        routing = _Routing(self)
        with routing.installed():
            results = self.group.run(tower)
        outputs = [r[0] for r in results]
        scopes = [(r[1], r[2]) for r in results]
        if step == "predict_step":
            with tf.device(self.builder.variable_device):
                kept = [_merge.keep(o, self.slices.sizes[i]) for i, o in enumerate(outputs)]
                return _merge.merge(kept)
        with tf.device(self.builder.variable_device):
            self._write_state(state_variables, state, scopes)
            return self._logs(outputs, routing.results)

    def _write_state(self, state_variables, state, scopes) -> None:
        """Combines what the towers changed: model state (over processes too), then
        metric state (per process; combined when results are read)."""
        per_tower = [
            [self._changed(scope, v, initial.get(id(v))) for v in state_variables]
            for scope, initial in scopes
        ]
        self.builder.state_writer.write(state_variables, per_tower, state, self.slices)
        metric_variables = [v for m in self.model.metrics for v in m.variables]
        known = {id(v) for v in metric_variables} | {id(v) for v in state_variables}
        for scope, _ in scopes:
            self._check_known(scope, known)
        per_tower = [
            [self._changed(scope, v, None) for v in metric_variables] for scope, _ in scopes
        ]
        old = [tf.convert_to_tensor(v.value) for v in metric_variables]
        self.builder.state_writer.write(
            metric_variables, per_tower, old, self.slices, processes=False
        )

    @staticmethod
    def _changed(scope: keras.StatelessScope, variable: Any, initial: Any) -> Any:
        value = scope.get_current_value(variable)
        return None if value is None or value is initial else value

    def _check_known(self, scope: keras.StatelessScope, known: set[int]) -> None:
        assigned = set(scope.state_mapping) - known
        if not assigned:
            return
        names = [v.path for v in self.model.variables if id(v) in assigned] or [
            f"{len(assigned)} variable(s) the model does not track"
        ]
        raise RuntimeError(
            "A model's own step assigned variables that replicate cannot combine over "
            f"towers: {names}. Inside a replicated step, state may change through the "
            "model's layers (non-trainable weights), its metrics and `optimizer.apply`; "
            "each tower's changes are combined by the variable's `aggregation`."
        )

    def _logs(self, outputs: list[Any], recorded: dict[int, tuple[Any, int]]) -> Any:
        """The step's return value, rebuilt from the combined state."""
        flat = [tf.nest.flatten(o) for o in outputs]
        metrics = list({id(m): m for m, _ in recorded.values()}.values())
        results = dict(
            zip(
                [id(m) for m in metrics],
                [tf.nest.flatten(r) for r in self.parallel.combined_results(metrics)],
            )
        )
        combined, averaged = [], []
        for position, leaf in enumerate(flat[0]):
            source = recorded.get(id(leaf))
            if source is not None:
                metric, index = source
                combined.append(results[id(metric)][index])
            elif tf.is_tensor(leaf) and leaf.shape.rank == 0 and leaf.dtype.is_floating:
                # A value of the step's own (a loss): the batch's, weighted by slice size.
                values = [[f[position]] for f in flat]
                combined.append(reduce.weighted_sum(values, self.omega)[0])
                averaged.append(position)
            else:
                combined.append(leaf)
        if averaged and self.backend.size > 1:
            for position, total in zip(
                averaged, self.backend.all_sum([combined[p] for p in averaged])
            ):
                combined[position] = total
        return tf.nest.pack_sequence_as(outputs[0], combined)


class UnseededRandom(RuntimeError):
    """A model's own step drew from Keras' global seed generator (`_refuse_unseeded`)."""


def _refuse_unseeded(scope: keras.StatelessScope) -> None:
    """Raises if the step drew from Keras' global seed generator (`keras.random.*` with no
    `seed=`): the model does not hold it, so its towers cannot get their own streams."""
    generator = _keras_compat.get_global_attribute("global_seed_generator")
    if generator is not None and id(generator.state) in scope.state_mapping:
        raise UnseededRandom(
            "A model's own step drew random numbers with `keras.random` and no `seed=`, from "
            "Keras' global SeedGenerator, which the model does not hold: replicate gives each "
            "tower its own stream only from a SeedGenerator the model holds. Create one in "
            "the model's `__init__` (`self.seed_generator = keras.random.SeedGenerator(1337)`) "
            "and pass `seed=self.seed_generator`, as Keras asks for under JAX."
        )


def run(parallel: Any, step: str, data: Any) -> Any:
    """Runs the template's own `step` ("train_step", ...) on the towers of `parallel`."""
    return TowerRun(parallel, data, collective=step != "predict_step")(step)
