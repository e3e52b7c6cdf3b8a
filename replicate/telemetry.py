"""GPU health from NVML (nvidia-ml-py): utilisation, memory, temperature, power.

Importable without TensorFlow, so that it can be checked on a GPU machine
that has nothing but nvidia-ml-py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, NamedTuple


@dataclass(frozen=True)
class GPUStat:
    """One GPU's readings; a field the GPU does not report is `None`."""

    index: int
    name: str
    utilization_percent: int | None
    memory_used_mib: float | None
    memory_total_mib: float | None
    temperature_c: int | None
    power_w: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class GPUStats(NamedTuple):
    """`gpu_stats()`'s answer: the GPUs, and why the list is empty when it is."""

    gpus: list[GPUStat]
    reason: str | None


def _optional(read, *args):
    import pynvml

    try:
        return read(*args)
    except pynvml.NVMLError:
        return None


def gpu_stats() -> GPUStats:
    """Reads every GPU that NVML sees. Never raises.

    Returns:
        `GPUStats(gpus, reason)`: one `GPUStat` per GPU and `reason=None`;
        or an empty list and the reason (no nvidia-ml-py, no NVIDIA driver,
        no GPU).

    Example:

    ```python
    gpus, reason = replicate.telemetry.gpu_stats()
    for gpu in gpus:
        print(gpu.index, gpu.name, gpu.utilization_percent, gpu.memory_used_mib)
    ```
    """
    try:
        import pynvml
    except ImportError:
        return GPUStats([], "nvidia-ml-py is not installed (pip install nvidia-ml-py)")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:
        return GPUStats([], f"NVML is not available: {error} (no NVIDIA driver on this machine)")
    except OSError as error:  # a broken driver install can fail below NVML
        return GPUStats([], f"NVML could not be loaded: {error}")
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            if isinstance(name, bytes):
                name = name.decode()
            utilization = _optional(pynvml.nvmlDeviceGetUtilizationRates, handle)
            memory = _optional(pynvml.nvmlDeviceGetMemoryInfo, handle)
            temperature = _optional(
                pynvml.nvmlDeviceGetTemperature, handle, pynvml.NVML_TEMPERATURE_GPU
            )
            power = _optional(pynvml.nvmlDeviceGetPowerUsage, handle)
            gpus.append(
                GPUStat(
                    index=index,
                    name=name,
                    utilization_percent=None if utilization is None else int(utilization.gpu),
                    memory_used_mib=None if memory is None else memory.used / 2**20,
                    memory_total_mib=None if memory is None else memory.total / 2**20,
                    temperature_c=None if temperature is None else int(temperature),
                    power_w=None if power is None else power / 1000.0,
                )
            )
    except pynvml.NVMLError as error:
        return GPUStats([], f"NVML failed while reading the GPUs: {error}")
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass
    if not gpus:
        return GPUStats([], "NVML found no GPU")
    return GPUStats(gpus, None)


def format_table(stats: GPUStats) -> str:
    """The readings as a fixed-width text table (or the reason there are none)."""
    if not stats.gpus:
        return f"no GPU telemetry: {stats.reason}"

    def show(value, fmt):
        return "-" if value is None else format(value, fmt)

    lines = [
        f"{'GPU':>3}  {'name':<28} {'util %':>6} {'memory MiB':>19} {'temp C':>6} {'power W':>8}"
    ]
    for g in stats.gpus:
        memory = f"{show(g.memory_used_mib, '.0f')} / {show(g.memory_total_mib, '.0f')}"
        lines.append(
            f"{g.index:>3}  {g.name[:28]:<28} {show(g.utilization_percent, 'd'):>6} "
            f"{memory:>19} {show(g.temperature_c, 'd'):>6} {show(g.power_w, '.1f'):>8}"
        )
    return "\n".join(lines)
