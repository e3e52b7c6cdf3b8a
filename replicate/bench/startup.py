"""Time to the first step, and the steady-state cost of each tower, against MirroredStrategy.

`startup`: the first `fit` of one step, tracing included, in a fresh process
for each figure, at 1, 2, 4 and 8 towers (replicas): how long users of a
wide box wait before anything trains. `overhead`: a model whose compute is
negligible (an MLP 32-32-10, batch 64), so that what grows with the towers is
the framework's own cost per tower; best of 3 timed epochs of 200 steps, in
a fresh process for each figure.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any

from replicate.bench import machine, report, runner

METHODS = ("replicate", "mirrored")
COUNTS = (1, 2, 4, 8)


def _model(name: str):
    import keras

    keras.utils.set_random_seed(0)
    if name in ("resnet", "resnet-sync"):
        model = keras.applications.ResNet50V2(weights=None, input_shape=(32, 32, 3), classes=10)
        for layer in model.layers:  # read at each call: the statistics of the global batch
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.synchronized = name == "resnet-sync"
        return model
    inputs = keras.Input((32,))
    hidden = keras.layers.Dense(32, activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.Dense(10)(hidden))


def _data(name: str, samples: int):
    import numpy as np

    rng = np.random.default_rng(0)
    shape = (32, 32, 3) if name.startswith("resnet") else (32,)
    x = rng.normal(size=(samples, *shape)).astype("float32")
    return x, rng.integers(0, 10, samples)


def _build(spec: dict[str, Any], devices: list[str]):
    import keras
    import tensorflow as tf

    import replicate

    def compile_(model):
        model.compile(
            optimizer=keras.optimizers.SGD(0.01),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=False,
        )
        return model

    if spec["method"] == "mirrored":
        with tf.distribute.MirroredStrategy(devices).scope():
            return compile_(_model(spec["model"]))
    with tf.device("/cpu:0"):
        template = _model(spec["model"])
    # The check at the first fit is timed apart (README); releases before it lack the option.
    quiet = {"check": False} if "check" in inspect.signature(replicate.replicate).parameters else {}
    return compile_(replicate.replicate(template, devices, **quiet))


def startup_worker(spec: dict[str, Any], devices: list[str]) -> None:
    """Seconds of the first one-step `fit` (model built before the clock starts)."""
    model = _build(spec, devices)
    x, y = _data(spec["model"], spec["per_tower"] * len(devices))
    start = time.perf_counter()
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    runner.emit({"seconds": time.perf_counter() - start})


def overhead_worker(spec: dict[str, Any], devices: list[str]) -> None:
    """Milliseconds per step: the best of `repeats` epochs after one warm-up epoch."""
    model = _build(spec, devices)
    x, y = _data("mlp", spec["batch"] * spec["steps"])
    times = [runner.time_fit(model, x, y, spec["batch"]) for _ in range(spec["repeats"] + 1)]
    runner.emit({"ms_per_step": times[1:]})


def run(args) -> dict[str, Any]:
    """The `startup` and `overhead` commands."""
    counts = [n for n in COUNTS if n <= args.devices]
    kind = args.command
    spec = {
        "kind": kind,
        "model": getattr(args, "model", "mlp") if kind == "startup" else "mlp",
        "per_tower": 8,
        "batch": args.batch or 64,
        "steps": args.steps or (100 if args.quick else 200),
        "repeats": args.repeats or 3,
    }
    processes = args.processes or (1 if args.quick else 2)
    runs = [(m, n, p) for p in range(processes) for n in counts for m in METHODS]
    progress = runner.progress(len(runs), kind)
    raw: dict[tuple[str, int], list[float]] = {}
    for method, n, _ in runs:
        result = runner.run_worker(
            "replicate.bench.worker", {**spec, "method": method, "devices": n}, timeout=1800
        )
        values = [result["seconds"]] if kind == "startup" else result["ms_per_step"]
        raw.setdefault((method, n), []).extend(values)
        progress.add(1)
    unit = "seconds" if kind == "startup" else "ms_per_step"
    records = [
        {
            "method": method,
            "towers": n,
            f"{unit}_best": min(values),
            f"{unit}_median": runner.median(values),
            "samples": values,
        }
        for (method, n), values in sorted(raw.items())
    ]
    payload = {
        "benchmark": kind,
        "machine": machine.describe(),
        "settings": {**spec, "processes": processes, "counts": counts},
        "records": records,
    }
    report.write(payload, Path(args.output), markdown)
    return payload


def markdown(payload: dict[str, Any]) -> str:
    """The table: one row per method, one column per tower count."""
    s = payload["settings"]
    startup = payload["benchmark"] == "startup"
    unit = "seconds" if startup else "ms_per_step"
    by = {(r["method"], r["towers"]): r for r in payload["records"]}
    title = (
        f"# Time to the first step: {s['model']}, {s['per_tower']} samples per tower"
        if startup
        else f"# Per-tower overhead: MLP 32-32-10, batch {s['batch']}, {s['steps']} steps"
    )
    what = (
        "Seconds of the first one-step `fit`, tracing included, each in a fresh process"
        if startup
        else f"Milliseconds per step, best of {s['repeats']} epochs after a warm-up epoch, "
        "each in a fresh process"
    )
    lines = [
        title,
        "",
        machine.markdown(payload["machine"]),
        f"{what}; best (median) of {s['processes']} process(es). SGD, `jit_compile=False`.",
        "",
        "| method | " + " | ".join(f"{n} tower(s)" for n in s["counts"]) + " |",
        "|---|" + "---|" * len(s["counts"]),
    ]
    for method in METHODS:
        cells = []
        for n in s["counts"]:
            r = by.get((method, n))
            cells.append(
                "-" if r is None else f"{r[unit + '_best']:.2f} ({r[unit + '_median']:.2f})"
            )
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    first, last = s["counts"][0], s["counts"][-1]
    for method in METHODS:
        a, b = by.get((method, first)), by.get((method, last))
        if a and b:
            if startup:
                lines.append(
                    f"\n{method}: {last} towers take {b[unit + '_best'] / a[unit + '_best']:.2f}x "
                    f"the first step of {first} (best)."
                )
            else:
                per = (b[unit + "_best"] - a[unit + "_best"]) / (last - first)
                lines.append(f"\n{method}: {per:.3f} ms per added tower (best).")
    return "\n".join(lines) + "\n"
