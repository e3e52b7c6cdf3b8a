"""Markdown tables and PNG charts for the benchmark results."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from replicate.bench import machine


def _pair(by: dict[tuple, dict[str, Any]], a: tuple, b: tuple) -> str:
    """Step-time ratio a/b as 'median (best)'."""
    median = _ratio_of(by[a]["ms_per_step_median"], by[b]["ms_per_step_median"])
    best = _ratio_of(by[a]["ms_per_step_best"], by[b]["ms_per_step_best"])
    return f"{median}x ({best}x)"


def write(
    payload: dict[str, Any],
    output: Path,
    markdown: Callable[[dict[str, Any]], str],
    chart: Callable[[dict[str, Any], Path], None] | None = None,
) -> None:
    """Writes `<benchmark>.json`, `.md` (and `.png` where there is a chart) into `output`.

    Args:
        payload: The results; `payload["benchmark"]` names the files.
        output: The report folder (created if missing).
        markdown: Makes the Markdown table from `payload`.
        chart: Draws the PNG chart, if the benchmark has one.
    """
    name = payload["benchmark"]
    output.mkdir(parents=True, exist_ok=True)
    (output / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (output / f"{name}.md").write_text(markdown(payload))
    if chart is not None:
        chart(payload, output / f"{name}.png")


def _ratio_of(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}"


def scaling_markdown(payload: dict[str, Any]) -> str:
    s = payload["settings"]
    lines = [
        "# Scaling: replicate against MirroredStrategy and plain fit; its multi-process backends",
        "",
        machine.markdown(payload["machine"]),
        f"Global batch {s['global_batch']} split over the towers, SGD, `jit_compile=False`; "
        f"{s['repeats_per_process']} interleaved repeats in each of {s['processes']} "
        f"processes. Horovod: {s['horovod']}. Collective: {s.get('collective', 'not run')}. "
        "Median and best (fastest) repeat: on a shared "
        "machine the best is the run least disturbed by others.",
        "",
        "| model | method | devices | ms/step median | ms/step best | examples/s (median) "
        "| scaling efficiency |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in payload["records"]:
        eff = "-" if r["scaling_efficiency"] is None else f"{r['scaling_efficiency']:.2f}"
        lines.append(
            f"| {r['model']} | {r['method']} | {r['devices']} | {r['ms_per_step_median']:.2f} | "
            f"{r['ms_per_step_best']:.2f} | {r['examples_per_second']:.0f} | {eff} |"
        )
    lines += ["", "Ratios of step time, median (best); below 1 means replicate is faster:", ""]
    for model in sorted({r["model"] for r in payload["records"]}):
        by = {(r["method"], r["devices"]): r for r in payload["records"] if r["model"] == model}

        for n in sorted({d for (_, d) in by}):
            if ("replicate", n) in by and ("mirrored", n) in by:
                lines.append(
                    f"- {model}: replicate/{n} vs MirroredStrategy/{n}: "
                    f"{_pair(by, ('replicate', n), ('mirrored', n))}"
                )
            for method, title in (("horovod", "Horovod"), ("collective", "collective")):
                if (method, n) in by and ("replicate", n) in by:
                    lines.append(
                        f"- {model}: {title} {n} processes x 1 tower vs replicate 1 process x "
                        f"{n} towers: {_pair(by, (method, n), ('replicate', n))}"
                    )
        if ("replicate", 1) in by and ("fit", 1) in by:
            lines.append(
                f"- {model}: replicate/1 vs plain fit: {_pair(by, ('replicate', 1), ('fit', 1))}"
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
        "keras/native (best) | max abs weight diff |",
        "|---|---|---|---|---|---|---|---|",
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
        kb = k["ms_per_step_best"] if k else None
        nb = n["ms_per_step_best"] if n else None
        diff = (k or n)["max_abs_weight_diff"]
        lines.append(
            f"| {opt} | {jit} | {devices} | {'-' if km is None else f'{km:.2f}'} | "
            f"{'-' if nm is None else f'{nm:.2f}'} | {_ratio_of(km, nm)} | {_ratio_of(kb, nb)} | "
            f"{diff:.2e} |"
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
        for color, method in enumerate(("fit", "replicate", "mirrored", "horovod", "collective")):
            rows = sorted(
                (r["devices"], r["examples_per_second"], r["global_batch"] / r["ms_per_step_best"])
                for r in payload["records"]
                if r["model"] == model and r["method"] == method
            )
            if rows:
                c = f"C{color}"
                xs = [row[0] for row in rows]
                ax.plot(xs, [row[1] for row in rows], marker="o", color=c, label=f"{method} median")
                ax.plot(
                    xs,
                    [row[2] * 1000 for row in rows],
                    marker="^",
                    linestyle="--",
                    color=c,
                    alpha=0.6,
                    label=f"{method} best",
                )
        ax.set_title(model)
        ax.set_xlabel("devices (towers or processes)")
        ax.set_ylabel("examples / second")
        ax.set_xticks(sorted({r["devices"] for r in payload["records"]}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
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
