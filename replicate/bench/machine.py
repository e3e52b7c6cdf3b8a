"""Describes the machine a benchmark ran on, for every report."""

from __future__ import annotations

import os
import platform
import threading
from importlib import metadata
from typing import Any

from replicate import telemetry


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe() -> dict[str, Any]:
    """CPU, cores, memory, GPUs (NVML) and library versions."""
    gpus, reason = telemetry.gpu_stats()
    try:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        memory_gib = None
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": None if memory_gib is None else round(memory_gib, 1),
        "gpus": [f"{g.index}: {g.name} ({g.memory_total_mib:.0f} MiB)" for g in gpus],
        "gpu_note": reason,
        "python": platform.python_version(),
        "tensorflow": _version("tensorflow"),
        "keras": _version("keras"),
        "horovod": _version("horovod"),
        "replicate": _version("keras-replicate"),  # the distribution's name
    }


def markdown(machine: dict[str, Any]) -> str:
    gpus = (
        ", ".join(machine["gpus"])
        or f"none ({machine['gpu_note']}); towers are simulated CPU devices"
    )
    return (
        f"- CPU: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB\n"
        f"- GPUs: {gpus}\n"
        f"- Python {machine['python']}, TensorFlow {machine['tensorflow']}, "
        f"Keras {machine['keras']}, Horovod {machine['horovod'] or 'not installed'}\n"
    )


class GPUMonitor:
    """Samples NVML every `interval` seconds in a thread; keeps peaks and means per GPU."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.samples: dict[int, list[telemetry.GPUStat]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> GPUMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for gpu in telemetry.gpu_stats().gpus:
                self.samples.setdefault(gpu.index, []).append(gpu)
            self._stop.wait(self.interval)

    def summary(self) -> list[dict[str, Any]]:
        out = []
        for index, readings in sorted(self.samples.items()):
            util = [r.utilization_percent for r in readings if r.utilization_percent is not None]
            mem = [r.memory_used_mib for r in readings if r.memory_used_mib is not None]
            out.append(
                {
                    "index": index,
                    "name": readings[0].name,
                    "samples": len(readings),
                    "utilization_mean_percent": sum(util) / len(util) if util else None,
                    "utilization_max_percent": max(util) if util else None,
                    "memory_max_mib": max(mem) if mem else None,
                }
            )
        return out
