"""Every command line answers `--help` and a wrong argument fast, quietly, without TensorFlow."""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
# What TensorFlow prints when it starts (absl, oneDNN, the CUDA stub, CPU features).
TENSORFLOW_LOG = re.compile(
    r"absl::InitializeLog|oneDNN|cudart_stub|cuda_|cpu_feature_guard|TensorFlow binary"
)
LIMIT = 1.0  # seconds; each command is timed three times and the best counts

HELP = [
    ["replicate", "--help"],
    ["replicate", "demo", "--help"],
    ["replicate", "devices", "--help"],
    ["replicate", "export", "--help"],
    ["replicate", "launch", "--help"],
    ["replicate-bench", "--help"],
    *[["replicate-bench", c, "--help"] for c in ("scaling", "optimizers", "precision")],
    ["replicate-bench", "consistency", "--help"],
]
WRONG = [
    (["replicate", "demo", "--devices", "0"], "--devices: must be a positive integer, got '0'"),
    (["replicate", "train"], "invalid choice: 'train'"),
    (["replicate-bench", "scaling", "--model", "vgg"], "unknown vgg; choose from mlp, convnet"),
    (["replicate-bench", "optimizers", "--repeats", "-1"], "must be a positive integer"),
]


def _timed(command: list[str], cwd: Path | None = None):
    best, result = float("inf"), None
    for _ in range(3):
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
        best = min(best, time.perf_counter() - start)
    return result, best


@pytest.mark.parametrize("command", HELP, ids=" ".join)
def test_help_is_fast_and_quiet(command):
    result, seconds = _timed([BIN / command[0], *command[1:]])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ")
    assert not TENSORFLOW_LOG.search(result.stdout + result.stderr), result.stderr
    assert seconds < LIMIT, f"{' '.join(command)} took {seconds:.2f} s"


@pytest.mark.parametrize("command, message", WRONG, ids=[" ".join(c) for c, _ in WRONG])
def test_a_wrong_argument_is_fast_and_quiet(command, message):
    result, seconds = _timed([BIN / command[0], *command[1:]])
    assert result.returncode == 2
    assert message in result.stderr
    assert not TENSORFLOW_LOG.search(result.stdout + result.stderr), result.stderr
    assert seconds < LIMIT, f"{' '.join(command)} took {seconds:.2f} s"


def test_python_m_benchmarks_help_from_a_checkout():
    result, seconds = _timed([sys.executable, "-m", "benchmarks", "--help"], cwd=ROOT)
    assert result.returncode == 0 and "replicate-bench" in result.stdout
    assert not TENSORFLOW_LOG.search(result.stderr)
    assert seconds < LIMIT


@pytest.mark.parametrize(
    "module, argv",
    [
        ("replicate.cli", ["launch", "--help"]),
        ("replicate.cli", ["demo", "--epochs", "x"]),
        ("replicate.bench.cli", ["--help"]),
        ("replicate.bench.cli", ["scaling", "--methods", "nope"]),
    ],
)
def test_parsing_imports_neither_tensorflow_nor_keras(module, argv):
    code = (
        "import sys\n"
        f"from {module} import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = sorted(m for m in ('tensorflow', 'keras', 'numpy') if m in sys.modules)\n"
        "print('IMPORTED', heavy, file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "IMPORTED []" in result.stderr, result.stderr[-2000:]
