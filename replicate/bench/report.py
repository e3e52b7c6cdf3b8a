"""Markdown tables and PNG charts for the benchmark results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from replicate.bench import machine


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}"


def scaling_markdown(payload: dict[str, Any]) -> str:
    s = payload["settings"]
    lines = [
        "# Scaling: replicate against MirroredStrategy, plain fit and Horovod",
        "",
        machine.markdown(payload["machine"]),
        f"Global batch {s['global_batch']} split over the towers, SGD, `jit_compile=False`; "
        f"median of {s['repeats_per_process']} interleaved repeats in each of "
        f"{s['processes']} processes. Horovod: {s['horovod']}.",
        "",
        "| model | method | devices | ms/step (median) | examples/s | scaling efficiency |",
        "|---|---|---|---|---|---|",
    ]
    for r in payload["records"]:
        eff = "-" if r["scaling_efficiency"] is None else f"{r['scaling_efficiency']:.2f}"
        lines.append(
            f"| {r['model']} | {r['method']} | {r['devices']} | {r['ms_per_step_median']:.2f} | "
            f"{r['examples_per_second']:.0f} | {eff} |"
        )
    lines += ["", "Ratios of step time (lower is better for replicate):", ""]
    for model in sorted({r["model"] for r in payload["records"]}):
        ms = {
            (r["method"], r["devices"]): r["ms_per_step_median"]
            for r in payload["records"]
            if r["model"] == model
        }
        for n in sorted({d for (_, d) in ms}):
            if ("replicate", n) in ms and ("mirrored", n) in ms:
                lines.append(
                    f"- {model}: replicate/{n} vs MirroredStrategy/{n}: "
                    f"{_ratio(ms[('replicate', n)], ms[('mirrored', n)])}x"
                )
            if ("horovod", n) in ms and ("replicate", n) in ms:
                lines.append(
                    f"- {model}: Horovod {n} processes x 1 tower vs replicate 1 process x "
                    f"{n} towers: {_ratio(ms[('horovod', n)], ms[('replicate', n)])}x"
                )
        if ("replicate", 1) in ms and ("fit", 1) in ms:
            lines.append(
                f"- {model}: replicate/1 vs plain fit: "
                f"{_ratio(ms[('replicate', 1)], ms[('fit', 1)])}x"
            )
    if any(payload.get("gpu_telemetry", {}).values()):
        lines += [
            "",
            "GPU telemetry during the runs (NVML):",
            "",
            "| model | GPU | mean util % | max util % | max memory MiB |",
            "|---|---|---|---|---|",
        ]
        for model, gpus in payload["gpu_telemetry"].items():
            for g in gpus:
                lines.append(
                    f"| {model} | {g['index']}: {g['name']} | {g['utilization_mean_percent']} | "
                    f"{g['utilization_max_percent']} | {g['memory_max_mib']} |"
                )
    return "\n".join(lines) + "\n"


def optimizers_markdown(payload: dict[str, Any]) -> str:
    s = payload["settings"]
    lines = [
        "# Keras 3 optimizers against native TensorFlow optimizers",
        "",
        machine.markdown(payload["machine"]),
        f"Model {s['model']}, batch {s['batch']}; median of {s['repeats_per_process']} interleaved "
        f"repeats (A, B, A, B, ...) after warm-up, in each of {s['processes']} processes. "
        f"Agreement: max |weight difference| after {s['agreement_steps']} steps from the "
        "same start.",
        "",
        "| optimizer | jit_compile | devices | keras ms/step | native ms/step | keras/native | "
        "max abs weight diff |",
        "|---|---|---|---|---|---|---|",
    ]
    rows: dict[tuple, dict[str, Any]] = {}
    for r in payload["records"]:
        rows.setdefault((r["optimizer"], r["jit_compile"], r["devices"]), {})[
            r["implementation"]
        ] = r
    for (opt, jit, devices), pair in rows.items():
        k, n = pair.get("keras"), pair.get("native")
        km = k["ms_per_step_median"] if k else None
        nm = n["ms_per_step_median"] if n else None
        diff = (k or n)["max_abs_weight_diff"]
        lines.append(
            f"| {opt} | {jit} | {devices} | {'-' if km is None else f'{km:.2f}'} | "
            f"{'-' if nm is None else f'{nm:.2f}'} | {_ratio(km, nm)} | {diff:.2e} |"
        )
    notes = payload.get("notes") or []
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def scaling_chart(payload: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    models = sorted({r["model"] for r in payload["records"]})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for method in ("fit", "replicate", "mirrored", "horovod"):
            pts = sorted(
                (r["devices"], r["examples_per_second"])
                for r in payload["records"]
                if r["model"] == model and r["method"] == method
            )
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.set_title(model)
        ax.set_xlabel("devices (towers or processes)")
        ax.set_ylabel("examples / second")
        ax.set_xticks(sorted({r["devices"] for r in payload["records"]}))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Scaling on {payload['machine']['cpu'][:50]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def optimizers_chart(payload: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    groups: dict[tuple, dict[str, float]] = {}
    for r in payload["records"]:
        key = (r["optimizer"], r["jit_compile"], r["devices"])
        groups.setdefault(key, {})[r["implementation"]] = r["ms_per_step_median"]
    labels = [f"{o}\n{'xla' if j else 'no xla'}, {d} dev" for (o, j, d) in groups]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels)), 4))
    xs = range(len(labels))
    for offset, impl in ((-0.2, "keras"), (0.2, "native")):
        ax.bar([x + offset for x in xs], [g.get(impl, 0) for g in groups.values()], 0.4, label=impl)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("ms / step (median)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Keras vs native optimizers on {payload['machine']['cpu'][:50]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
