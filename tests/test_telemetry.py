"""GPU telemetry: importable without TensorFlow, a reason instead of an exception."""

import subprocess
import sys
from pathlib import Path

from replicate import telemetry


def test_without_nvml_returns_empty_list_and_reason():
    stats = telemetry.gpu_stats()
    if stats.gpus:  # a machine with a GPU: the readings are plausible
        for gpu in stats.gpus:
            assert gpu.memory_total_mib > 0 and gpu.name
        return
    assert stats.gpus == []
    assert "NVML" in stats.reason
    assert telemetry.format_table(stats) == f"no GPU telemetry: {stats.reason}"


def test_importable_and_usable_without_tensorflow():
    script = (
        "import sys; sys.modules['tensorflow'] = None; sys.modules['keras'] = None\n"
        "from replicate import telemetry\n"
        "gpus, reason = telemetry.gpu_stats()\n"
        "print(len(gpus), reason is None or 'NVML' in reason)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    count, ok = out.split()
    assert int(count) >= 0 and ok == "True"


def test_table_formats_readings():
    stats = telemetry.GPUStats(
        [
            telemetry.GPUStat(0, "Test GPU", 87, 1024.0, 81559.0, 61, 312.5),
            telemetry.GPUStat(1, "Test GPU", None, None, None, None, None),
        ],
        None,
    )
    lines = telemetry.format_table(stats).splitlines()
    assert lines[1].split() == ["0", "Test", "GPU", "87", "1024", "/", "81559", "61", "312.5"]
    assert lines[2].split() == ["1", "Test", "GPU", "-", "-", "/", "-", "-", "-"]


def test_devices_command_prints_tensorflow_devices_and_nvml_answer():
    script = Path(sys.executable).with_name("replicate")
    out = subprocess.run([script, "devices"], capture_output=True, text=True, check=True).stdout
    assert "TensorFlow devices (towers by default):" in out
    assert "/cpu:0" in out or "/gpu:0" in out
    assert "GPUs (NVML):" in out
    assert telemetry.format_table(telemetry.gpu_stats()).splitlines()[0] in out
    # How the installed Horovod was built (make horovod: Gloo, no GPU).
    import horovod.tensorflow as hvd

    assert hvd.gloo_built() and "Horovod 0.28.1: built with GLOO" in out
