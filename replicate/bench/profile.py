"""Where the time of one multi-process step goes: `replicate-bench profile`.

A job of 2 processes x 1 tower on one host, under each backend, times three
things inside each process, interleaved (A, B, C, A, B, C, ...):

- `replicated step`: the benchmark MLP trained through `replicate()` with the
  backend, a whole `fit` epoch divided by its steps (what users pay);
- `local step`: the same model and batch trained by plain Keras `fit` on this
  process alone (its forward and backward pass and Keras' own cost, with the
  other process busy on the same cores, as in the job);
- `exchange alone`: the backend's collective for one step (every gradient,
  the sample count and the loss in one call, `Backend.exchange`), in a
  `tf.function`, with nothing else running.

The figures are milliseconds per step; the replicated step minus the local
step is what the processes' exchange and agreement cost inside a step.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from replicate.bench import machine, report, runner

KEYS = ("replicated step", "local step", "exchange alone")


def worker(spec: dict[str, Any]) -> None:
    """One process of 2 (under `replicate launch` or `horovodrun`)."""
    import replicate

    replicate.simulate_devices(1)
    backend = replicate.get_backend(spec["backend"])  # the collective runtime: before TF starts
    import keras
    import tensorflow as tf

    from replicate.bench import models

    batch, steps = spec["batch"], spec["steps"]
    x, y = models.data("mlp", batch * steps, seed=backend.rank)

    def compiled(model):
        model.compile(
            optimizer=keras.optimizers.SGD(0.01),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return model

    parallel = compiled(replicate.replicate(models.build("mlp"), ["/cpu:0"], backend=backend))
    local = compiled(models.build("mlp"))
    grads = [tf.zeros(v.shape, v.dtype) for v in local.trainable_variables]

    @tf.function
    def exchange():
        return backend.exchange(tf.constant(batch), grads, scalars=[tf.constant(1.0)])

    def exchanges() -> float:
        start = time.perf_counter()
        for _ in range(steps):
            exchange()
        return 1000.0 * (time.perf_counter() - start) / steps

    contenders = [
        runner.Contender(KEYS[0], lambda: runner.time_fit(parallel, x, y, batch)),
        runner.Contender(KEYS[1], lambda: runner.time_fit(local, x, y, batch)),
        runner.Contender(KEYS[2], exchanges),
    ]
    times = runner.interleave(contenders, spec["repeats"], warmup=1)
    # `replicate launch` sets TensorFlow's own variables, which the backend leaves be.
    threads = backend.threads or int(os.environ.get("TF_NUM_INTRAOP_THREADS", 0)) or None
    if backend.is_chief:
        runner.emit({"times": times, "threads": threads})


def run(args) -> dict[str, Any]:
    """The `profile` command: one or more 2-process jobs per installed backend."""
    from replicate.bench.checks import backend_jobs, job_spec

    spec = job_spec(args, "profile")
    jobs = args.processes or 1
    records: dict[str, Any] = {}
    for backend, (times, last) in backend_jobs(spec, jobs).items():
        records[backend] = {
            "threads": last["threads"],
            **{k: runner.summary(v) for k, v in times.items()},
        }
    payload = {
        "benchmark": "profile",
        "machine": machine.describe(),
        "settings": {**spec, "jobs": jobs},
        "records": records,
    }
    report.write(payload, Path(args.output), markdown)
    return payload


def markdown(payload: dict[str, Any]) -> str:
    s = payload["settings"]
    lines = [
        "# Where a multi-process step goes",
        "",
        machine.markdown(payload["machine"]),
        f"2 processes x 1 tower on one host, the benchmark MLP (784-512-512-10), SGD, batch "
        f"{s['batch']} per process, {s['steps']} steps per timed epoch, {s['repeats']} "
        f"interleaved repeats in each of {s['jobs']} job(s); milliseconds per step, median "
        "(best). See `replicate/bench/profile.py` for what each row times.",
        "",
        "| backend | threads per pool | " + " | ".join(KEYS) + " | replicated - local |",
        "|---|---|" + "---|" * (len(KEYS) + 1),
    ]
    for backend, rows in payload["records"].items():
        cells = [
            f"{rows[k]['ms_per_step_median']:.2f} ({rows[k]['ms_per_step_best']:.2f})" for k in KEYS
        ]
        gap = rows[KEYS[0]]["ms_per_step_median"] - rows[KEYS[1]]["ms_per_step_median"]
        lines.append(f"| {backend} | {rows['threads']} | " + " | ".join(cells) + f" | {gap:.2f} |")
    return "\n".join(lines) + "\n"
