"""How the corpus compares two runs where exactness is not the promise.

`Trains` (random draws: both runs learn alike), `Moves` (adversarial training),
`Differs` and `Raises` (documented limits, asserted so that a test fails when the
limit changes), and the measures they share.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from conformance.harness import Run


def max_abs(a: list[np.ndarray], b: list[np.ndarray]) -> float | None:
    """The largest absolute difference between two lists of weights (`None` if unlike)."""
    if not a or not b or len(a) != len(b):
        return None
    return max((float(np.max(np.abs(u - v))) if u.size else 0.0) for u, v in zip(a, b))


def relative(a: Mapping[str, float], b: Mapping[str, float]) -> float | None:
    """The largest relative difference between the values two runs report under one key."""
    keys = sorted(set(a) & set(b))
    if not keys:
        return None
    return max(abs(a[k] - b[k]) / max(abs(a[k]), abs(b[k]), 1e-12) for k in keys)


def last(history: Mapping[str, list[float]]) -> dict[str, float]:
    """Each history entry's last epoch (what a model without a `test_step` is compared on)."""
    return {k: float(v[-1]) for k, v in history.items()}


@dataclass(frozen=True)
class Trains:
    """For random draws (Dropout, noise, random augmentation): both runs learn alike.

    Asserted: `evaluate` before `fit` agrees within 1e-5 relative on both (inference
    mode draws nothing), each run's loss falls to at most `(1 - fall)` of its start,
    and the replicated final loss is within `band` (relative) of the one-device one.
    The loss is `evaluate`'s before and after `fit`, or with `on="history"` (models
    without a `test_step`, or whose inference loss waits on slow moving statistics)
    the first and last epoch's training loss.
    """

    fall: float
    band: float
    key: str = "loss"
    on: str = "evaluate"

    def describe(self) -> str:
        where = "evaluate" if self.on == "evaluate" else "training"
        return (
            f"both runs' {where} {self.key} falls by >= {self.fall:.1%}; "
            f"final {self.key} within {self.band:.1%}"
        )

    def __call__(self, reference: Run, run: Run) -> None:
        if reference.before and run.before:
            gap = relative(reference.before, run.before)
            assert gap <= 1e-5, f"evaluate before fit differs: {gap:.3g}"
        ends = []
        for name, outcome in (("one device", reference), ("replicated", run)):
            if self.on == "evaluate":
                start, end = outcome.before[self.key], outcome.after[self.key]
            else:
                start, end = outcome.history[self.key][0], outcome.history[self.key][-1]
            assert end <= (1 - self.fall) * start, (
                f"{name}: {self.key} went from {start:.4g} to {end:.4g}, "
                f"less than the {self.fall:.1%} fall required"
            )
            ends.append(end)
        gap = abs(ends[1] - ends[0]) / abs(ends[0])
        assert gap <= self.band, f"final {self.key} {ends[1]:.4g} vs {ends[0]:.4g} ({gap:.3g})"


@dataclass(frozen=True)
class Moves:
    """For adversarial training (GANs), whose losses need not fall: both runs train alike.

    Asserted: the replicated run changed exactly the weight tensors one device changed
    (some stay put by design: a WGAN critic's output bias has no gradient), every
    logged value is finite, and each of `keys` in the last epoch's logs is within
    `band` (absolute: these losses can sit near zero or change sign) of one device's.
    """

    keys: tuple[str, ...]
    band: float

    def describe(self) -> str:
        return (
            f"the same weight tensors move; logs finite; final {', '.join(self.keys)} "
            f"within {self.band:g}"
        )

    def __call__(self, reference: Run, run: Run) -> None:
        moved = []
        for name, outcome in (("one device", reference), ("replicated", run)):
            pairs = zip(outcome.initial, outcome.weights, strict=True)
            moved.append([i for i, (a, b) in enumerate(pairs) if not np.array_equal(a, b)])
            values = [v for vs in outcome.history.values() for v in vs]
            assert np.all(np.isfinite(values)), f"{name}: {outcome.history}"
        assert moved[0] and moved[0] == moved[1], f"moved tensors differ: {moved}"
        for key in self.keys:
            ref, got = reference.history[key][-1], run.history[key][-1]
            assert abs(got - ref) <= self.band, f"final {key} {got:.4g} vs {ref:.4g}"


@dataclass(frozen=True)
class Differs:
    """A documented limit: the replicated run differs from one device by at least this much.

    `on="evaluate"` compares `evaluate`'s results (the last epoch's logs for a model
    without a `test_step`), `on="history"` the last epoch's training logs, all of
    them or only `key`, relatively; `on="weights"` the weights (max abs difference).
    """

    at_least: float
    on: str = "evaluate"
    key: str | None = None

    def describe(self) -> str:
        what = self.key or ("weights" if self.on == "weights" else "loss and metrics")
        where = {"evaluate": "", "history": " in the training logs", "weights": ""}
        return f"differs: {what}{where[self.on]} >= {self.at_least:g} apart"

    def __call__(self, reference: Run, run: Run) -> None:
        if self.on == "weights":
            gap = max_abs(reference.weights, run.weights)
        else:
            if self.on == "history" or not reference.after:
                ref, got = last(reference.history), last(run.history)
            else:
                ref, got = reference.after, run.after
            if self.key is not None:
                ref, got = {self.key: ref[self.key]}, {self.key: got[self.key]}
            gap = relative(ref, got)
        assert gap is not None and gap >= self.at_least, (
            f"the documented difference is gone: {self.key or self.on} differ by {gap}, "
            f"expected at least {self.at_least}"
        )


@dataclass(frozen=True)
class Raises:
    """A documented limit: the replicated `fit` stops with this error and message."""

    error: type[BaseException]
    pattern: str

    def describe(self) -> str:
        return f"fit raises {self.error.__name__} matching `{self.pattern}`"

    def __call__(self, reference: Run, run: Run) -> None:
        assert run.error is not None, "the replicated fit was expected to fail and did not"
        assert isinstance(run.error, self.error), f"{type(run.error).__name__}: {run.error}"
        text = "\n".join([str(run.error), *getattr(run.error, "__notes__", [])])
        assert re.search(self.pattern, text), text[:2000]
