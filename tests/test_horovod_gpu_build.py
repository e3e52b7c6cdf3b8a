"""The NCCL (GPU) build of Horovod by `scripts/build-horovod.sh --gpu`, checked without a GPU.

The build lives in its own environment (.venv-gpu, made by `make horovod-gpu`), so the
checks run that environment's python in a subprocess. Without it they are skipped.
"""

import glob
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "build-horovod.sh"
GPU_VENV = Path(os.environ.get("REPLICATE_GPU_VENV", ROOT / ".venv-gpu"))
GPU_PYTHON = GPU_VENV / "bin" / "python"

BUILT = """
import json
import horovod.tensorflow as hvd
names = ("nccl", "cuda", "gloo")
print(json.dumps({name: bool(getattr(hvd, f"{name}_built")()) for name in names}))
"""

# Where the library is, found without loading it (so a library that does not
# load is still inspected).
PATHS = """
import importlib.util, json, os
import tensorflow as tf
(horovod,) = importlib.util.find_spec("horovod").submodule_search_locations
print(json.dumps({"horovod": horovod, "tensorflow_lib": tf.sysconfig.get_lib()}))
"""


def _script(*args):
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def test_build_script_help():
    result = _script("--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: scripts/build-horovod.sh [VENV]")
    assert "--gpu [--tensorflow-from DIR] [VENV]" in result.stdout
    assert "HOROVOD_WHEEL_CACHE" in result.stdout


def test_build_script_rejects_bad_arguments():
    result = _script("--no-such-flag")
    assert result.returncode == 2
    assert "error: unknown option --no-such-flag" in result.stderr
    assert "Usage:" in result.stderr

    result = _script("--tensorflow-from", ".venv")
    assert result.returncode == 2
    assert "--tensorflow-from goes with --gpu" in result.stderr

    result = _script("--gpu", "one", "two")
    assert result.returncode == 2
    assert "more than one VENV" in result.stderr


def _gpu_python(code):
    if not GPU_PYTHON.exists():
        pytest.skip(f"no GPU Horovod environment at {GPU_VENV}; `make horovod-gpu` builds it")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [str(GPU_PYTHON), "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.horovod_gpu
def test_gpu_build_has_nccl_cuda_and_gloo():
    built = _gpu_python(BUILT)
    assert built == {"nccl": True, "cuda": True, "gloo": True}, built


@pytest.mark.horovod_gpu
def test_gpu_build_has_no_undefined_symbols():
    paths = _gpu_python(PATHS)
    (library,) = glob.glob(os.path.join(paths["horovod"], "tensorflow", "mpi_lib*.so"))
    # Horovod's library finds TensorFlow's libraries in the process that imported
    # TensorFlow; ldd alone needs to be told where they are. NCCL it finds itself.
    env = dict(os.environ, LD_LIBRARY_PATH=paths["tensorflow_lib"])
    result = subprocess.run(
        ["ldd", "-r", library], capture_output=True, text=True, timeout=60, env=env
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "not found" not in output, output
    assert "libnccl.so.2" in output, output
    undefined = [line for line in output.splitlines() if "undefined symbol" in line]
    assert not [line for line in undefined if "AsGpuStreamValue" in line], undefined
    assert not undefined, undefined[:20]
