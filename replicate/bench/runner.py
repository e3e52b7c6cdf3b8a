"""Timing machinery: interleaved repeats inside a process, fresh processes around them."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

RESULT_MARK = "BENCHMARK-RESULT "


@dataclass
class Contender:
    """One way of training, ready to be timed: `run()` does one timed pass."""

    key: str
    run: Callable[[], float]
    info: dict[str, Any] = field(default_factory=dict)


def time_fit(model, x, y, batch_size: int) -> float:
    """Milliseconds per step of one whole `fit` epoch over `x` (wall time / steps).

    The epoch's own set-up (data adapter, distributed iterators, callbacks) is
    included, since a user pays it every epoch; the first call's tracing is
    left to the warm-up round.
    """
    steps = -(-len(x) // batch_size)
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    return 1000.0 * (time.perf_counter() - start) / steps


def interleave(
    contenders: list[Contender], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Runs A, B, C, A, B, C, ...: `warmup` uncounted rounds, then `repeats` counted ones."""
    times: dict[str, list[float]] = {c.key: [] for c in contenders}
    for round_ in range(warmup + repeats):
        for contender in contenders:
            ms = contender.run()
            if round_ >= warmup:
                times[contender.key].append(ms)
    return times


def emit(payload: dict[str, Any]) -> None:
    """Prints a worker's result on one marked line for the parent to read."""
    print(RESULT_MARK + json.dumps(payload), flush=True)


def run_worker(
    module: str, spec: dict[str, Any], launcher: list[str] | None = None, timeout: float = 900
) -> dict[str, Any]:
    """Runs `python -m <module> <spec>` in a fresh process (optionally under a launcher)."""
    command = [*(launcher or []), sys.executable, "-m", module, json.dumps(spec)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    for line in reversed(result.stdout.splitlines()):
        _, mark, payload = line.partition(RESULT_MARK)
        if mark:
            return json.loads(payload)
    raise RuntimeError(
        f"benchmark worker {' '.join(command[:6])} ... exited with {result.returncode} "
        f"without a result:\n{result.stderr[-3000:]}"
    )


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def summary(values: list[float]) -> dict[str, float]:
    """Milliseconds per step over repeats, as the reports keep them: median and best."""
    return {"ms_per_step_median": median(values), "ms_per_step_best": min(values)}


def progress(total: int, label: str) -> Any:
    """A progress bar over `total` benchmark runs: Keras' own `Progbar`.

    Prints `label` on a line of its own, then returns a
    `keras.utils.Progbar` (counting runs, with elapsed and remaining time);
    call `.add(1)` after each run.
    """
    import keras

    print(f"{label}: {total} run{'s' if total != 1 else ''}", flush=True)
    return keras.utils.Progbar(total, unit_name="run")
