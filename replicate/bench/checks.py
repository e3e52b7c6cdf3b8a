"""Three measurements the README quotes: how close replicated mixed-precision training comes
to one device (`precision`), what `ConsistencyCheck` costs per step (`consistency`), and
what the per-step agreement token costs (`agreement`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from replicate.bench import machine, report, runner

POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")


def precision_worker(spec: dict[str, Any], devices: list[str]) -> None:
    """Single-device fit against `replicate` over `devices`, same start, one policy."""
    import keras
    import numpy as np

    import replicate
    from replicate.demo import load_digits

    keras.mixed_precision.set_global_policy(spec["policy"])
    (x, y), (x_test, y_test) = load_digits()

    def make():
        # The demo convnet without its Dropout and (per-tower) BatchNormalization,
        # so that float32 is exact and the other rows show rounding alone.
        inputs = keras.Input((8, 8, 1))
        h = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(inputs)
        h = keras.layers.Conv2D(64, 3, padding="same", activation="relu")(h)
        h = keras.layers.Flatten()(keras.layers.MaxPooling2D(2)(h))
        h = keras.layers.Dense(128, activation="relu")(h)
        outputs = keras.layers.Dense(10, activation="softmax", dtype="float32")(h)
        return keras.Model(inputs, outputs)

    def trained(parallel: bool):
        keras.utils.set_random_seed(spec["seed"])
        model = make()
        target = replicate.replicate(model, devices) if parallel else model
        target.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        history = target.fit(
            x, y, batch_size=spec["batch"], epochs=spec["epochs"], shuffle=False, verbose=0
        ).history
        # The template is compiled either way: evaluate it on one device.
        return model, history, model.evaluate(x_test, y_test, verbose=0)[1]

    single, single_history, single_accuracy = trained(False)
    towers, tower_history, tower_accuracy = trained(True)
    weights = [
        float(np.abs(a - b).max()) for a, b in zip(single.get_weights(), towers.get_weights())
    ]
    losses = [abs(a - b) / abs(b) for a, b in zip(tower_history["loss"], single_history["loss"])]
    runner.emit(
        {
            "policy": spec["policy"],
            "max_abs_weight_diff": max(weights),
            "max_rel_loss_diff": max(losses),
            "final_loss": {
                "one_device": single_history["loss"][-1],
                "towers": tower_history["loss"][-1],
            },
            "test_accuracy": {"one_device": single_accuracy, "towers": tower_accuracy},
        }
    )


def consistency_worker(spec: dict[str, Any]) -> None:
    """One process of 2 (replicate launch): steps without and with ConsistencyCheck."""
    import replicate

    replicate.simulate_devices(1)
    backend = replicate.get_backend("collective")
    import keras

    from replicate.bench import models

    x, y = models.data("mlp", spec["batch"] * spec["steps"], seed=backend.rank)
    model = models.build("mlp")
    parallel = replicate.replicate(model, ["/cpu:0"], backend=backend)
    parallel.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )

    def timed(callbacks):
        def run():
            import time

            start = time.perf_counter()
            parallel.fit(x, y, batch_size=spec["batch"], epochs=1, verbose=0, callbacks=callbacks())
            return 1000.0 * (time.perf_counter() - start) / spec["steps"]

        return run

    # One callback per contender, as in one long fit: its checksum is traced once.
    check = replicate.callbacks.ConsistencyCheck
    every_100, every_batch = check(every_n_batches=100), check(every_n_batches=1)
    contenders = [
        runner.Contender("none", timed(list)),
        runner.Contender("every 100", timed(lambda: [every_100])),
        runner.Contender("every batch", timed(lambda: [every_batch])),
    ]
    times = runner.interleave(contenders, spec["repeats"], warmup=1)
    if backend.is_chief:
        runner.emit({"times": times})


def agreement_worker(spec: dict[str, Any]) -> None:
    """One process of 2: steps as before this release (`lockstep=False`) and with the
    per-step agreement token, interleaved, on the same data."""
    import replicate

    replicate.simulate_devices(1)
    first = replicate.get_backend(spec["backend"])  # the collective runtime: before TF starts
    import keras

    from replicate.bench import models

    x, y = models.data("mlp", spec["batch"] * spec["steps"], seed=first.rank)

    def contender(key: str, lockstep: bool) -> runner.Contender:
        parallel = replicate.replicate(
            models.build("mlp"), ["/cpu:0"], backend=spec["backend"], lockstep=lockstep
        )
        parallel.compile(
            optimizer=keras.optimizers.SGD(0.01),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )

        def run() -> float:
            import time

            start = time.perf_counter()
            parallel.fit(x, y, batch_size=spec["batch"], epochs=1, verbose=0)
            return 1000.0 * (time.perf_counter() - start) / spec["steps"]

        return runner.Contender(key, run)

    contenders = [contender("without token", False), contender("with token", True)]
    times = runner.interleave(contenders, spec["repeats"], warmup=1)
    if first.is_chief:
        runner.emit({"times": times})


def launcher(backend: str) -> list[str]:
    """The command that starts a 2-process job on this host under `backend`."""
    bin_dir = Path(sys.executable).parent
    if backend == "horovod":
        return [str(bin_dir / "horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo"]
    return [str(bin_dir / "replicate"), "launch", "--nproc", "2", "--"]


def job_spec(args, kind: str) -> dict[str, Any]:
    """The settings of a benchmark made of 2-process jobs (`--batch`, `--steps`, `--repeats`)."""
    return {
        "kind": kind,
        "batch": args.batch or 64,
        "steps": args.steps or (100 if args.quick else 300),
        "repeats": args.repeats or (3 if args.quick else 6),
    }


def backend_jobs(
    spec: dict[str, Any], jobs: int
) -> dict[str, tuple[dict[str, list[float]], dict[str, Any]]]:
    """Runs `jobs` 2-process jobs of the worker under each installed backend.

    Returns:
        `{backend: (times, last)}`: each contender's milliseconds per step over
        every job, and the last job's whole result.
    """
    from replicate.backends.horovod import build_info

    backends = ["collective"] + (["horovod"] if build_info()["installed"] else [])
    progress = runner.progress(jobs * len(backends), spec["kind"])
    results = {}
    for backend in backends:
        times: dict[str, list[float]] = {}
        for _ in range(jobs):
            out = runner.run_worker(
                "replicate.bench.worker", {**spec, "backend": backend}, launcher=launcher(backend)
            )
            for key, values in out["times"].items():
                times.setdefault(key, []).extend(values)
            progress.add(1)
        results[backend] = (times, out)
    return results


def _agreement(args, info: dict[str, Any]) -> dict[str, Any]:
    spec = job_spec(args, "agreement")
    records: dict[str, Any] = {}
    for backend, (times, _) in backend_jobs(spec, args.processes or 2).items():
        records[backend] = {k: {**runner.summary(v), "samples": v} for k, v in times.items()}
        # Each round times both, one right after the other: the ratio within a round
        # shares the machine's state (load from other jobs changes over seconds).
        pairs = zip(times["with token"], times["without token"], strict=True)
        records[backend]["paired_ratio_median"] = runner.median(a / b for a, b in pairs)
    return {"benchmark": "agreement", "machine": info, "settings": spec, "records": records}


def run(args) -> dict[str, Any]:
    """The `precision`, `consistency` and `agreement` commands."""
    info = machine.describe()
    if args.command == "agreement":
        payload = _agreement(args, info)
        report.write(payload, Path(args.output), agreement_markdown)
        return payload
    if args.command == "precision":
        spec = {
            "kind": "precision",
            "devices": args.devices,
            "batch": args.batch or 64,
            "epochs": 2 if args.quick else 5,
            "seed": 0,
        }
        rows = []
        progress = runner.progress(len(POLICIES), "precision")
        for policy in POLICIES:
            rows.append(runner.run_worker("replicate.bench.worker", {**spec, "policy": policy}))
            progress.add(1)
        payload = {"benchmark": "precision", "machine": info, "settings": spec, "records": rows}
    else:
        spec = {
            "kind": "consistency",
            "batch": args.batch or 64,
            "steps": args.steps or (100 if args.quick else 300),
            "repeats": args.repeats or (3 if args.quick else 6),
        }
        times: dict[str, list[float]] = {}
        processes = args.processes or 2
        progress = runner.progress(processes, "consistency")
        for _ in range(processes):
            out = runner.run_worker("replicate.bench.worker", spec, launcher=launcher("collective"))
            for key, values in out["times"].items():
                times.setdefault(key, []).extend(values)
            progress.add(1)
        payload = {
            "benchmark": "consistency",
            "machine": info,
            "settings": spec,
            "records": {k: runner.summary(v) for k, v in times.items()},
        }
    markdown = precision_markdown if args.command == "precision" else consistency_markdown
    report.write(payload, Path(args.output), markdown)
    return payload


def precision_markdown(payload: dict[str, Any]) -> str:
    s = payload["settings"]
    lines = [
        "# Mixed precision through replicate against one device",
        "",
        machine.markdown(payload["machine"]),
        f"The digits convnet (two convolutions, pooling, two dense layers; no Dropout or "
        f"BatchNormalization), Adam(1e-3), batch {s['batch']}, {s['epochs']} epochs, the same "
        f"start: one device against {s['devices']} towers, per dtype policy.",
        "",
        "| policy | max abs weight diff | max rel loss diff | final loss one device / towers "
        "| test accuracy one device / towers |",
        "|---|---|---|---|---|",
    ]
    for r in payload["records"]:
        lines.append(
            f"| {r['policy']} | {r['max_abs_weight_diff']:.2e} | {r['max_rel_loss_diff']:.2e} | "
            f"{r['final_loss']['one_device']:.4f} / {r['final_loss']['towers']:.4f} | "
            f"{r['test_accuracy']['one_device']:.4f} / {r['test_accuracy']['towers']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def consistency_markdown(payload: dict[str, Any]) -> str:
    s, r = payload["settings"], payload["records"]
    base = r["none"]["ms_per_step_median"]
    lines = [
        "# The cost of ConsistencyCheck",
        "",
        machine.markdown(payload["machine"]),
        f"2 processes (replicate launch, collective backend) x 1 tower, the benchmark MLP, "
        f"batch {s['batch']} per process, {s['steps']} steps per timed epoch, "
        f"{s['repeats']} interleaved repeats per job.",
        "",
        "| check | ms/step median | ms/step best | overhead (median) |",
        "|---|---|---|---|",
    ]
    for key, row in r.items():
        lines.append(
            f"| {key} | {row['ms_per_step_median']:.2f} | {row['ms_per_step_best']:.2f} | "
            f"{100 * (row['ms_per_step_median'] / base - 1):+.1f}% |"
        )
    return "\n".join(lines) + "\n"


def agreement_markdown(payload: dict[str, Any]) -> str:
    s = payload["settings"]
    lines = [
        "# The cost of the per-step agreement token",
        "",
        machine.markdown(payload["machine"]),
        f"2 processes x 1 tower, the benchmark MLP (784-512-512-10), SGD, batch {s['batch']} "
        f"per process, {s['steps']} steps per timed epoch (a whole `fit` epoch, its own set-up "
        f"included), {s['repeats']} interleaved repeats per job. `without token` is "
        "`lockstep=False`: the steps as they were before the token (the phase tokens at the "
        "start of fit and of each epoch remain in both).",
        "",
        "| backend | steps | ms/step median | ms/step best | cost (median) | cost (best) "
        "| cost (median of paired rounds) |",
        "|---|---|---|---|---|---|---|",
    ]
    for backend, rows in payload["records"].items():
        base = rows["without token"]
        for key in ("without token", "with token"):
            row = rows[key]
            paired = rows["paired_ratio_median"] if key == "with token" else 1.0
            lines.append(
                f"| {backend} | {key} | {row['ms_per_step_median']:.2f} | "
                f"{row['ms_per_step_best']:.2f} | "
                f"{100 * (row['ms_per_step_median'] / base['ms_per_step_median'] - 1):+.1f}% | "
                f"{100 * (row['ms_per_step_best'] / base['ms_per_step_best'] - 1):+.1f}% | "
                f"{100 * (paired - 1):+.1f}% |"
            )
    return "\n".join(lines) + "\n"
