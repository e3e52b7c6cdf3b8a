"""The conformance harness: one example, trained on one device and through `replicate()`.

An `Example` is a public Keras example re-expressed small: a function that builds
its model, one that compiles it (the plain model or the replicated one), and one
that gives synthetic data of the example's shapes and dtypes from a fixed seed.
`Runner` trains it on one device and through `replicate.replicate(model,
devices[:n])` from the same initial weights (the same seed), with a batch size
the towers do not divide and a short last batch, `shuffle=False`, and `check`
compares the two by the example's declared status:

- `exact`: weights after `fit` within `EXACT_WEIGHTS`, `evaluate` loss and
  metrics within `loss_tolerance` relative (1e-6, or 1e-5 where float32 sums
  over towers round differently);
- `tolerance`: within the example's stated tolerances (unsynchronized
  BatchNormalization), or a stated criterion for random draws
  (`criteria.Trains`, `criteria.Moves`);
- `limit`: the documented difference or error is asserted (`criteria.Differs`,
  `criteria.Raises`), so the test fails if the limit changes.

Synthetic data comes from `synthetic`; the families' modules list their examples
in `EXAMPLES` and `registry` gathers them.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import pytest

import replicate
from conformance.criteria import Raises, Trains, last, max_abs, relative

TOWERS = (2, 3)
EXACT_WEIGHTS = 1e-5
EXACT_LOSS = 1e-6
STATUSES = ("exact", "tolerance", "limit")
FAMILIES = ("structured", "text", "vision", "sequence", "generative", "own_step", "settings")


@dataclass(frozen=True)
class Data:
    """What `fit` and `evaluate` get: inputs, targets, per-sample and per-class weights."""

    x: Any
    y: Any = None
    sample_weight: Any = None
    class_weight: Mapping[int, float] | None = None

    def fit_arguments(self) -> dict[str, Any]:
        found = {"x": self.x, "y": self.y, "sample_weight": self.sample_weight}
        found["class_weight"] = self.class_weight
        return {k: v for k, v in found.items() if v is not None}

    def evaluate_arguments(self) -> dict[str, Any]:
        found = {"x": self.x, "y": self.y, "sample_weight": self.sample_weight}
        return {k: v for k, v in found.items() if v is not None}


@dataclass
class Run:
    """What one training run left: weights, history, `evaluate` before and after, error."""

    weights: list[np.ndarray] = field(default_factory=list)
    history: dict[str, list[float]] = field(default_factory=dict)
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    error: BaseException | None = None
    initial: list[np.ndarray] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # replicate's, through towers


@dataclass
class Measurement:
    """One row of the results table: an example at a number of towers."""

    example: Example
    towers: int
    weight_diff: float | None
    loss_diff: float | None
    error: str | None
    outcome: str = ""


@dataclass(frozen=True)
class Example:
    """A public Keras example, re-expressed small.

    Attributes:
        name: Short identifier, unique in the corpus.
        source: Path of the original in the `keras-team/keras-io` repository.
        family: One of `FAMILIES`.
        build: Builds the model; the harness seeds Keras first (`seed`).
        compile: Compiles a model: the plain one, or the `ReplicatedModel`.
        data: Synthetic data of the example's shapes and dtypes (numpy, fixed seed).
        status: `"exact"`, `"tolerance"` or `"limit"`.
        reason: Why not exact: the cause (`criterion_text` says what is asserted).
        batch_size: Global batch; the towers (2 and 3) do not divide it.
        epochs: Epochs of `fit`.
        weight_tolerance: Max abs weight difference allowed.
        loss_tolerance: Max relative difference of `evaluate` results allowed.
        criterion: Replaces the tolerances (`Trains`, `Differs`, `Raises`).
        evaluate: Whether the model can `evaluate` (a GAN has no `test_step`).
        faults: Towers -> `xfail` reason (`"kind N: ..."`) of a known engine fault.
        alarm: A pattern that replicate's warning must match (the check at the first
            `fit`, or the state writer): the documented cause, named. `None`: the
            run through towers must raise no alarm.
        seed: Seed set before each build.
    """

    name: str
    source: str
    family: str
    build: Callable[[], keras.Model]
    compile: Callable[[keras.Model], None]
    data: Callable[[], Data]
    status: str = "exact"
    reason: str = ""
    batch_size: int = 25
    epochs: int = 1
    weight_tolerance: float = EXACT_WEIGHTS
    loss_tolerance: float = EXACT_LOSS
    criterion: Callable[[Run, Run], None] | None = None
    evaluate: bool = True
    faults: Mapping[int, str] = field(default_factory=dict)
    alarm: str | None = None
    seed: int = 0

    def criterion_text(self) -> str:
        """What the test asserts, in words (the results table's criterion column)."""
        if isinstance(self.criterion, Trains) and self.evaluate:
            return "evaluate before fit exact; " + self.criterion.describe()
        if self.criterion is not None:
            return self.criterion.describe()
        return f"weights <= {self.weight_tolerance:g}, evaluate <= {self.loss_tolerance:g} relative"

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"`status` must be one of {STATUSES}. Received: {self.status!r}")
        if self.family not in FAMILIES:
            raise ValueError(f"`family` must be one of {FAMILIES}. Received: {self.family!r}")
        if self.status != "exact" and not self.reason:
            raise ValueError(f"{self.name}: a {self.status} example must state its reason")
        if self.status == "limit" and self.criterion is None:
            raise ValueError(f"{self.name}: a limit must be asserted (`criterion`)")
        if any(self.batch_size % n == 0 for n in TOWERS):
            raise ValueError(f"{self.name}: batch_size={self.batch_size} divides among towers")
        for towers, reason in self.faults.items():
            if towers not in TOWERS or not re.match(r"kind [1-9]: ", reason):
                raise ValueError(f"{self.name}: faults must map towers to 'kind N: ...'")


def cases(examples: list[Example]) -> list[Any]:
    """`pytest.param`s for every example at every tower count, known faults marked."""
    params = []
    for example in examples:
        for towers in TOWERS:
            marks = []
            if towers in example.faults:
                marks.append(pytest.mark.xfail(strict=True, reason=example.faults[towers]))
            params.append(pytest.param(example, towers, id=f"{example.name}-{towers}", marks=marks))
    return params


class Runner:
    """Trains examples on one device (once per example) and over towers."""

    def __init__(self, devices: list[str]):
        self.devices = list(devices)
        self._data: dict[str, Data] = {}
        self._reference: dict[str, Run] = {}

    def data(self, example: Example) -> Data:
        if example.name not in self._data:
            self._data[example.name] = example.data()
        return self._data[example.name]

    def _model(self, example: Example) -> keras.Model:
        keras.backend.clear_session()
        keras.utils.set_random_seed(example.seed)
        return example.build()

    def _train(self, example: Example, model: keras.Model, runnable: keras.Model) -> Run:
        data, run = self.data(example), Run()
        check_before = example.evaluate and isinstance(example.criterion, Trains)
        try:
            example.compile(runnable)
            if check_before:
                run.before = self._evaluate(example, runnable, data)
            history = runnable.fit(
                **data.fit_arguments(),
                batch_size=example.batch_size,
                epochs=example.epochs,
                shuffle=False,
                verbose=0,
            )
            run.history = {k: [float(v) for v in vs] for k, vs in history.history.items()}
            if example.evaluate:
                run.after = self._evaluate(example, runnable, data)
        except Exception as error:  # noqa: BLE001 - the error is what some examples assert
            run.error = error
        run.weights = [np.array(w) for w in model.get_weights()]
        return run

    def _evaluate(self, example: Example, model: keras.Model, data: Data) -> dict[str, float]:
        found = model.evaluate(
            **data.evaluate_arguments(), batch_size=example.batch_size, verbose=0, return_dict=True
        )
        return {k: float(v) for k, v in found.items()}

    def reference(self, example: Example) -> Run:
        """The one-device run, trained once per example."""
        if example.name not in self._reference:
            model = self._model(example)
            initial = [np.array(w) for w in model.get_weights()]
            run = self._train(example, model, model)
            if run.error is not None:
                raise RuntimeError(f"{example.name} fails on one device") from run.error
            run.initial = initial
            self._reference[example.name] = run
        return self._reference[example.name]

    def replicated(self, example: Example, towers: int) -> Run:
        """The run through `replicate.replicate(model, devices[:towers])`."""
        reference = self.reference(example)
        model = self._model(example)
        initial = [np.array(w) for w in model.get_weights()]
        assert max_abs(initial, reference.initial) in (None, 0.0), "the two builds differ"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                parallel = replicate.replicate(model, self.devices[:towers])
            except Exception as error:  # noqa: BLE001 - refusals are measured too
                return Run(error=error, initial=initial)
            run = self._train(example, model, parallel)
        run.initial = initial
        run.warnings = [str(w.message) for w in caught if str(w.message).startswith("replicate")]
        return run

    def measure(self, example: Example, towers: int) -> tuple[Run, Run, Measurement]:
        reference, run = self.reference(example), self.replicated(example, towers)
        if example.evaluate:
            loss_diff = relative(reference.after, run.after)
        else:
            loss_diff = relative(last(reference.history), last(run.history))
        error = None if run.error is None else f"{type(run.error).__name__}: {run.error}"
        measured = Measurement(
            example, towers, max_abs(reference.weights, run.weights), loss_diff, error
        )
        return reference, run, measured


def check(example: Example, reference: Run, run: Run, measured: Measurement) -> None:
    """Asserts the example's declared status on the two runs, and replicate's alarm."""
    if example.alarm is None:
        assert not run.warnings, (
            f"an alarm on a model documented as {example.status}: {run.warnings}"
        )
    else:
        assert any(re.search(example.alarm, w) for w in run.warnings), (
            f"the documented cause ({example.alarm}) was not named: {run.warnings}"
        )
    if isinstance(example.criterion, Raises):
        example.criterion(reference, run)
        return
    assert run.error is None, measured.error[:3000]
    if example.criterion is not None:
        example.criterion(reference, run)
        return
    assert measured.weight_diff is not None, "no weights to compare"
    assert measured.weight_diff <= example.weight_tolerance, (
        f"weights differ by {measured.weight_diff:.3g} (allowed {example.weight_tolerance:.1g})"
    )
    if measured.loss_diff is not None:
        assert measured.loss_diff <= example.loss_tolerance, (
            f"evaluate differs by {measured.loss_diff:.3g} relative "
            f"(allowed {example.loss_tolerance:.1g}): {reference.after or last(reference.history)}"
            f" vs {run.after or last(run.history)}"
        )
