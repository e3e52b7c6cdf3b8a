"""Time to the first step, and the steady-state cost of each tower, against MirroredStrategy.

`startup`: the first `fit` of one step, tracing included, in a fresh process
for each figure, at 1, 2, 4 and 8 towers (replicas): how long users of a
wide box wait before anything trains. With `--phases`, replicate's first step
is split: the second one-step `fit` of the same process is the step without
tracing, and a first `fit` in a process whose graph optimizer (Grappler) is
off (`tf.config.optimizer.set_experimental_options`, an experiment only:
later steps then run unoptimized) gives Grappler's share. `overhead`: a model whose compute is
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
GRAPPLER_OFF = "replicate, Grappler off"  # a `--phases` run: replicate's first step split
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
    """Seconds of the first one-step `fit` (model built before the clock starts), and of
    the second (`again`: the same step, traced and optimized already)."""
    import tensorflow as tf

    if spec.get("grappler") is False:
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    grappler = not tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer")
    model = _build(spec, devices)
    x, y = _data(spec["model"], spec["per_tower"] * len(devices))
    traced = [0.0]  # seconds in `train_step`'s Python: it runs only while the step is traced
    train_step = model.train_step

    def timed_train_step(data):
        start = time.perf_counter()
        try:
            return train_step(data)
        finally:
            traced[0] += time.perf_counter() - start

    model.train_step = timed_train_step
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        model.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
        seconds.append(time.perf_counter() - start)
    runner.emit(
        {"seconds": seconds[0], "again": seconds[1], "traced": traced[0], "grappler": grappler}
    )


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
    methods = [*METHODS, *([GRAPPLER_OFF] if getattr(args, "phases", False) else [])]
    runs = [(m, n, p) for p in range(processes) for n in counts for m in methods]
    progress = runner.progress(len(runs), kind)
    raw: dict[tuple[str, int], list[float]] = {}
    phases: dict[tuple[str, int], list[dict[str, Any]]] = {}  # startup's worker results
    for method, n, _ in runs:
        worker_spec = {**spec, "method": "replicate" if method == GRAPPLER_OFF else method}
        if method == GRAPPLER_OFF:
            worker_spec["grappler"] = False
        result = runner.run_worker(
            "replicate.bench.worker", {**worker_spec, "devices": n}, timeout=1800
        )
        values = [result["seconds"]] if kind == "startup" else result["ms_per_step"]
        raw.setdefault((method, n), []).extend(values)
        if "again" in result:
            phases.setdefault((method, n), []).append(result)
        progress.add(1)
    unit = "seconds" if kind == "startup" else "ms_per_step"
    records = [
        {
            "method": method,
            "towers": n,
            f"{unit}_best": min(values),
            f"{unit}_median": runner.median(values),
            "samples": values,
            **(_phase_medians(phases[method, n]) if (method, n) in phases else {}),
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


def _phase_medians(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The medians of startup workers' second fits and tracing seconds, and whether
    Grappler ran."""
    return {
        "again_median": runner.median([r["again"] for r in results]),
        "traced_median": runner.median([r["traced"] for r in results]),
        "grappler": results[-1]["grappler"],
    }


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
    if startup and any(r["method"] == GRAPPLER_OFF for r in payload["records"]):
        lines += ["", *_phases(by, s["counts"])]
    return "\n".join(lines) + "\n"


def _phases(by: dict[tuple[str, int], dict[str, Any]], counts: list[int]) -> list[str]:
    """Where replicate's first step goes, from medians: the Python of `train_step`
    (tracing), Grappler's share (the first fit less the first fit with Grappler off,
    whose unoptimized kernels make it a lower bound), the step with the fit's own
    set-up (the second fit), and the rest (TensorFlow's other passes over the step,
    creating its kernels, Python outside `train_step`'s body)."""
    lines = [
        "## Where replicate's first step goes",
        "",
        "Seconds, medians. Tracing: the Python of `train_step` (it runs only while the step "
        "is traced). Grappler: the first fit less the first fit in a process whose graph "
        "optimizer is off (a lower bound: its kernels run unoptimized; from different "
        "processes, so a share under the noise can come out below 0). The step: the second "
        "one-step fit of the same process, the fit's own set-up included. The rest: what "
        "is left: TensorFlow's other passes over the step and creating its kernels, and "
        "Python outside `train_step`'s body (the README splits it with a CPU profile).",
        "",
        "| towers | first fit | tracing | Grappler | the step | the rest |",
        "|---|---|---|---|---|---|",
    ]
    for n in counts:
        on, off = by.get(("replicate", n)), by.get((GRAPPLER_OFF, n))
        if on is None or off is None or "again_median" not in on:
            continue
        first, step, trace = on["seconds_median"], on["again_median"], on["traced_median"]
        grappler = first - off["seconds_median"]
        rest = first - trace - grappler - step
        cells = " | ".join(f"{v:.2f}" for v in (first, trace, grappler, step, rest))
        lines.append(f"| {n} | {cells} |")
    return lines
