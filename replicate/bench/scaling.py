"""Throughput against the number of towers: replicate, MirroredStrategy, plain fit, and
replicate's two multi-process backends (Horovod, TensorFlow's collective runtime)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from replicate.bench import (
    METHODS,  # noqa: F401 (the choices, re-exported)
    machine,
    models,
    report,
    runner,
)

# Methods that run as n processes of 1 tower, started by their launcher.
PROCESS_METHODS = ("horovod", "collective")


def _compile(model, lr: float = 0.01) -> None:
    import keras

    model.compile(
        optimizer=keras.optimizers.SGD(lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
    )


def worker(spec: dict[str, Any], devices: list[str]) -> None:
    """Times plain fit, replicate(n) and MirroredStrategy(n) in one process, interleaved."""
    import tensorflow as tf

    import replicate

    name, batch = spec["model"], spec["batch"]
    x, y = models.data(name, batch * spec["steps"], seed=spec["seed"])
    contenders = []

    def add(key, model, info):
        contenders.append(runner.Contender(key, lambda: runner.time_fit(model, x, y, batch), info))

    if "fit" in spec["methods"]:
        with tf.device(devices[0]):
            plain = models.build(name)
        _compile(plain)
        add("fit/1", plain, {"method": "fit", "towers": 1})
    for n in spec["counts"]:
        if "replicate" in spec["methods"]:
            with tf.device("/cpu:0"):
                template = models.build(name)
            parallel = replicate.replicate(template, devices[:n])
            _compile(parallel)
            add(f"replicate/{n}", parallel, {"method": "replicate", "towers": n})
        if "mirrored" in spec["methods"]:
            strategy = tf.distribute.MirroredStrategy(devices[:n])
            with strategy.scope():
                mirrored = models.build(name)
                _compile(mirrored)
            add(f"mirrored/{n}", mirrored, {"method": "mirrored", "towers": n})
    times = runner.interleave(contenders, spec["repeats"], warmup=1)
    runner.emit({"times": times})


def process_worker(spec: dict[str, Any]) -> None:
    """One process of a multi-process backend: one tower, its share of the global
    batch; rank 0 reports."""
    import replicate

    replicate.simulate_devices(1)
    # Before TensorFlow starts: the collective runtime is configured then, and the
    # backend sizes the thread pools to this process's share of the host, as it does
    # for any user's script (replicate.threads).
    backend = replicate.get_backend(spec["backend"])
    import tensorflow as tf

    name, batch = spec["model"], spec["batch"] // backend.size
    x, y = models.data(name, batch * spec["steps"], seed=spec["seed"] + backend.rank)
    with tf.device("/cpu:0"):
        template = models.build(name)
    parallel = replicate.replicate(template, ["/cpu:0"], backend=backend)
    _compile(parallel)
    key = spec["backend"]
    contender = runner.Contender(key, lambda: runner.time_fit(parallel, x, y, batch))
    times = runner.interleave([contender], spec["repeats"], warmup=1)
    if backend.is_chief:
        runner.emit({"times": {f"{key}/{backend.size}": times[key]}})


def process_method_available(method: str) -> str | None:
    """None when `method` can run here, else why not."""
    if method == "collective":
        return None
    from replicate.backends.horovod import build_info

    if not build_info()["installed"]:
        return "Horovod is not installed (make horovod)"
    if shutil.which("horovodrun", path=str(Path(sys.executable).parent)) is None:
        return "horovodrun is not on the PATH of this Python"
    return None


def _launcher(method: str, n: int) -> list[str]:
    here = Path(sys.executable).parent
    if method == "horovod":
        return [str(here / "horovodrun"), "-np", str(n), "-H", f"localhost:{n}", "--gloo"]
    return [str(here / "replicate"), "launch", "--nproc", str(n), "--"]


def run(args) -> dict[str, Any]:
    """The `scaling` command: spawns workers, aggregates, writes the three reports."""
    quick = args.quick
    counts = list(range(1, args.devices + 1))
    batch = args.batch or 128
    steps = args.steps or (48 if quick else 200)
    repeats = args.repeats or (4 if quick else 7)
    processes = args.processes or 2
    methods = [m for m in args.methods if m not in PROCESS_METHODS]
    reasons = {
        m: process_method_available(m) if m in args.methods else "not requested"
        for m in PROCESS_METHODS
    }
    process_methods = [m for m in PROCESS_METHODS if reasons[m] is None]
    machine_info = machine.describe()
    results: dict[str, dict[str, Any]] = {}
    for name in args.models:
        model_steps = max(6, steps // 4) if name != "mlp" else steps
        model_batch = batch
        spec = {
            "kind": "scaling",
            "model": name,
            "devices": args.devices,
            "counts": counts,
            "batch": model_batch,
            "steps": model_steps,
            "repeats": repeats,
            "methods": methods,
        }
        launches = [(m, n) for m in process_methods for n in counts[1:]]
        progress = runner.progress(processes * (1 + len(launches)), f"scaling {name}")
        times: dict[str, list[float]] = {}
        with machine.GPUMonitor() as monitor:
            for p in range(processes):
                out = runner.run_worker("replicate.bench.worker", {**spec, "seed": p})
                progress.add(1)
                _extend(times, out["times"])
                for method, n in launches:
                    out = runner.run_worker(
                        "replicate.bench.worker",
                        {**spec, "kind": "processes", "backend": method, "seed": p},
                        launcher=_launcher(method, n),
                    )
                    progress.add(1)
                    _extend(times, out["times"])
        results[name] = {
            "batch": model_batch,
            "steps": model_steps,
            "times": times,
            "gpus": monitor.summary(),
        }
    records = _records(results)
    payload = {
        "benchmark": "scaling",
        "machine": machine_info,
        "settings": {
            "quick": quick,
            "devices": args.devices,
            "repeats_per_process": repeats,
            "processes": processes,
            "global_batch": batch,
            "jit_compile": False,
            "optimizer": "SGD(0.01)",
            "horovod": reasons["horovod"] or "measured",
            "collective": reasons["collective"] or "measured",
        },
        "records": records,
        "gpu_telemetry": {name: r["gpus"] for name, r in results.items()},
    }
    report.write(payload, Path(args.output), report.scaling_markdown, report.scaling_chart)
    return payload


def _extend(times: dict[str, list[float]], new: dict[str, list[float]]) -> None:
    for key, values in new.items():
        times.setdefault(key, []).extend(values)


def _records(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    records = []
    for name, result in results.items():
        base: dict[str, float] = {}
        for key in sorted(result["times"], key=lambda k: (k.split("/")[0], int(k.split("/")[1]))):
            method, towers = key.split("/")
            towers = int(towers)
            ms = runner.median(result["times"][key])
            throughput = result["batch"] / (ms / 1000.0)
            if towers == 1 or method not in base:
                base.setdefault(method, throughput)
            one = base.get(method) if method not in PROCESS_METHODS else base.get("replicate")
            records.append(
                {
                    "model": name,
                    "method": method,
                    "devices": towers,
                    "global_batch": result["batch"],
                    "ms_per_step_median": round(ms, 3),
                    "ms_per_step_best": round(min(result["times"][key]), 3),
                    "ms_per_step_all": [round(v, 3) for v in result["times"][key]],
                    "examples_per_second": round(throughput, 1),
                    "scaling_efficiency": None
                    if not one
                    else round(throughput / (towers * one), 3),
                }
            )
    return records
