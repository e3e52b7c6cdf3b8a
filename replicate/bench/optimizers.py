"""Keras 3 optimizers against native TensorFlow optimizers, same model, data and settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from replicate.bench import (
    OPTIMIZERS,  # noqa: F401 (the choices, re-exported)
    machine,
    models,
    report,
    runner,
)

# The same hyperparameters for both implementations.
SETTINGS: dict[str, dict[str, Any]] = {
    "sgd": {"learning_rate": 0.01},
    "momentum": {"learning_rate": 0.01, "momentum": 0.9},
    "nesterov": {"learning_rate": 0.01, "momentum": 0.9, "nesterov": True},
    "adam": {"learning_rate": 0.001, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7},
    "rmsprop": {"learning_rate": 0.001, "rho": 0.9, "epsilon": 1e-7},
    "adagrad": {"learning_rate": 0.01, "initial_accumulator_value": 0.1},
}

NOTES = {
    "sgd": "Same update; agreement is exact up to float rounding.",
    "momentum": "Keras keeps v = m*v - lr*g and adds v; the native kernel keeps a = m*a + g and "
    "subtracts lr*a. Equal while the learning rate is constant.",
    "nesterov": "As momentum, with the Nesterov look-ahead in both; equal for a constant rate.",
    "adam": "Same formula in both ('epsilon hat': lr*sqrt(1-b2^t)/(1-b1^t) * m/(sqrt(v)+eps)); "
    "the native kernel's usual default epsilon is 1e-8 and Keras' 1e-7, so both get 1e-7 here. "
    "Where a weight's gradients are about as small as epsilon (rarely active units of a wide "
    "layer), Adam's per-weight normalisation amplifies float rounding up to about lr per "
    "step, so the difference grows with width; the tests see 3e-7 on a small model.",
    "rmsprop": "Conventions differ: the native kernel starts the mean square at 1 (Keras at 0) "
    "and adds epsilon inside the square root (Keras outside), so the first steps are much "
    "smaller natively; a large difference is expected and is not an error.",
    "adagrad": "Keras adds epsilon=1e-7 outside the square root; the native kernel adds none. "
    "Both start the accumulator at 0.1.",
}


def _optimizer(kind: str, implementation: str):
    import keras

    from replicate.optimizers import NativeOptimizer

    h = dict(SETTINGS[kind])
    if implementation == "native":
        name = "momentum" if kind in ("momentum", "nesterov") else kind
        return NativeOptimizer(name, **h)
    if kind in ("sgd", "momentum", "nesterov"):
        return keras.optimizers.SGD(**h)
    if kind == "adam":
        return keras.optimizers.Adam(**h)
    if kind == "rmsprop":
        return keras.optimizers.RMSprop(**h)
    return keras.optimizers.Adagrad(**h)


def _model(spec: dict[str, Any], kind: str, implementation: str, jit: bool, devices: list[str]):
    import keras
    import tensorflow as tf

    import replicate

    with tf.device("/cpu:0"):
        model = models.build(spec["model"], hidden=spec["hidden"])
    target = model if len(devices) == 1 else replicate.replicate(model, devices)
    target.compile(
        optimizer=_optimizer(kind, implementation),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit,
        steps_per_execution=spec["steps"],
    )
    return model, target


def agreement(spec: dict[str, Any], kind: str, x, y, *, native: Any = None) -> float:
    """Max |weight difference| between Keras and native after `len(x) / batch` steps.

    Both start from the same weights and see the same batches; `native`
    replaces the native optimizer (a test passes a wrong one to check that
    the difference shows).
    """
    import numpy as np

    trained = []
    for implementation in ("keras", "native"):
        model, target = _model(spec, kind, implementation, False, ["/cpu:0"])
        if implementation == "native" and native is not None:
            target.compile(optimizer=native, loss=target.loss, steps_per_execution=spec["steps"])
        target.fit(x, y, batch_size=spec["batch"], epochs=1, shuffle=False, verbose=0)
        trained.append(model.get_weights())
    return float(max(np.abs(a - b).max() for a, b in zip(*trained, strict=True)))


def worker(spec: dict[str, Any], devices: list[str]) -> None:
    """Times every (optimizer, implementation, jit, devices) in one process, interleaved."""
    batch, steps = spec["batch"], spec["steps"]
    k = spec["agreement_steps"]
    x, y = models.data(spec["model"], batch * max(steps, k), seed=spec["seed"])
    xt, yt = x[: batch * steps], y[: batch * steps]
    contenders = []
    configurations = [(False, 1), (True, 1)]
    if len(devices) > 1:
        configurations += [(False, len(devices)), (True, len(devices))]
    for kind in spec["optimizers"]:
        for jit, count in configurations:
            for implementation in ("keras", "native"):
                _, target = _model(spec, kind, implementation, jit, devices[:count])
                info = {
                    "optimizer": kind,
                    "implementation": implementation,
                    "jit_compile": jit,
                    "devices": count,
                }
                contenders.append(
                    runner.Contender(
                        f"{kind}/{implementation}/{int(jit)}/{count}",
                        lambda t=target: runner.time_fit(t, xt, yt, batch),
                        info,
                    )
                )
    times = runner.interleave(contenders, spec["repeats"], warmup=1)
    diffs = {
        kind: agreement(spec, kind, x[: batch * k], y[: batch * k]) for kind in spec["optimizers"]
    }
    runner.emit({"times": times, "info": {c.key: c.info for c in contenders}, "agreement": diffs})


def run(args) -> dict[str, Any]:
    """The `optimizers` command: fresh worker processes, aggregated into three reports."""
    quick = args.quick
    spec = {
        "kind": "optimizers",
        "model": args.model,
        "optimizers": args.optimizer_names,
        "devices": args.devices,
        "batch": args.batch or 128,
        "hidden": 1024 if quick else 2048,
        "steps": args.steps or (10 if quick else 40),
        "repeats": args.repeats or 5,
        "agreement_steps": 10,
    }
    processes = args.processes or (1 if quick else 2)
    machine_info = machine.describe()
    progress = runner.progress(processes, "optimizers")
    times: dict[str, list[float]] = {}
    info: dict[str, dict[str, Any]] = {}
    agreement: dict[str, float] = {}
    with machine.GPUMonitor() as monitor:
        for p in range(processes):
            out = runner.run_worker("replicate.bench.worker", {**spec, "seed": p})
            for key, values in out["times"].items():
                times.setdefault(key, []).extend(values)
            info.update(out["info"])
            agreement = out["agreement"]
            progress.add(1)
    records = []
    for key, values in times.items():
        entry = info[key]
        records.append(
            {
                **entry,
                "model": f"{spec['model']} (hidden {spec['hidden']})",
                "batch": spec["batch"],
                "ms_per_step_median": round(runner.median(values), 3),
                "ms_per_step_best": round(min(values), 3),
                "ms_per_step_all": [round(v, 3) for v in values],
                "max_abs_weight_diff": agreement[entry["optimizer"]],
            }
        )
    payload = {
        "benchmark": "optimizers",
        "machine": machine_info,
        "settings": {
            "model": f"{spec['model']} (hidden {spec['hidden']})",
            "batch": spec["batch"],
            "steps_per_pass": spec["steps"],
            "repeats_per_process": spec["repeats"],
            "processes": processes,
            "agreement_steps": spec["agreement_steps"],
            "hyperparameters": SETTINGS,
            "quick": quick,
            "native": "replicate.optimizers.NativeOptimizer: the fused kernels that the "
            "tf.compat.v1.train optimizers run (ResourceApplyAdam, ...)",
            "timing": "wall time of one fit epoch / steps, steps_per_execution = steps",
        },
        "records": records,
        "notes": [f"{k}: {NOTES[k]}" for k in spec["optimizers"]]
        + [
            "Rows with more than one device train through replicate; there jit_compile=True "
            "compiles each tower with XLA on its device, and the update runs outside XLA."
        ],
        "gpu_telemetry": monitor.summary(),
    }
    report.write(payload, Path(args.output), report.optimizers_markdown, report.optimizers_chart)
    return payload
