#!/usr/bin/env bash
# The first things to run on a machine with NVIDIA GPUs, in order, each saying
# what it checks; it stops at the first failure. Needs two GPUs or more.
#
# Usage: scripts/gpu-check.sh [OUTPUT]
#          OUTPUT: folder for the logs and the benchmark reports
#          (default gpu-check-<date>-<time>).
# Environment: PYTHON, the Python with TensorFlow (with CUDA), replicate and the
#              GPU build of Horovod (default: python on the PATH; horovodrun must
#              be beside it), e.g. PYTHON=/opt/venv/bin/python in the GPU image.
#              BENCH_FLAGS, flags for both benchmarks (default --quick; set it
#              to '' for the full runs).
#
# In the GPU image: docker run --rm --gpus all --ipc host replicate:gpu \
#                     scripts/gpu-check.sh /tmp/gpu-check
set -euo pipefail

case ${1:-} in
  -h | --help)
    sed -n '/^# Usage:/,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
    exit 0
    ;;
esac

out=${1:-gpu-check-$(date +%Y%m%d-%H%M%S)}
python=${PYTHON:-python}
if ! command -v "$python" >/dev/null; then
  echo "error: no Python '$python'; set PYTHON to the environment's python" >&2
  exit 1
fi
bin=$(dirname "$(command -v "$python")")
bench_flags=${BENCH_FLAGS---quick}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}

step=0
# step "what it checks" command [args...]: runs the command (under set -e, so a
# failing line inside a function fails the step), its output shown and kept in
# $out/step<N>.log; a failure ends the whole check.
step() {
  local what=$1 status
  shift
  step=$((step + 1))
  log=$out/step$step.log
  echo
  echo "== $step. $what"
  echo "\$ $*"
  set +e
  (set -e; "$@") 2>&1 | tee "$log"
  status=${PIPESTATUS[0]}
  set -e
  if [ "$status" != 0 ]; then
    echo >&2
    echo "FAILED at step $step: $what" >&2
    echo "(output in $out/step$step.log; the later checks were not run)" >&2
    exit 1
  fi
}

# The console scripts beside $python, or their modules (an environment such as
# .venv-gpu sees replicate through a .pth file, without the console scripts).
replicate() {
  if [ -x "$bin/replicate" ]; then "$bin/replicate" "$@"; else "$python" -m replicate.cli "$@"; fi
}
replicate_bench() {
  if [ -x "$bin/replicate-bench" ]; then
    "$bin/replicate-bench" "$@"
  else
    "$python" -m replicate.bench.cli "$@"
  fi
}

gpus_and_driver() {
  nvidia-smi
  nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv
  local count driver
  count=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)
  echo "GPUs: $count; driver $driver"
  if [ "${driver%%.*}" -lt 580 ]; then
    echo "note: driver older than 580: a Horovod built by 'scripts/build-horovod.sh --gpu'"
    echo "      with nvcc from PyPI (CUDA 13; not the GPU image, which uses nvcc 12.5)"
    echo "      may fail to launch its kernels here (step 4 would show it)"
  fi
  [ "$count" -ge 2 ] || { echo "error: these checks need 2 GPUs, found $count"; return 1; }
}

devices() {
  replicate devices
  "$python" - <<'PY'
import tensorflow as tf

gpus = tf.config.list_physical_devices("GPU")
print(f"TensorFlow {tf.__version__} (CUDA {tf.sysconfig.get_build_info().get('cuda_version')}) sees {len(gpus)} GPU(s)")
assert len(gpus) >= 2, "TensorFlow sees fewer than 2 GPUs"
PY
}

horovod_build() {
  "$python" - <<'PY'
import horovod.tensorflow as hvd

built = {name: bool(getattr(hvd, f"{name}_built")()) for name in ("nccl", "cuda", "gloo", "mpi")}
print("Horovod built with:", ", ".join(k for k, v in built.items() if v))
assert built["nccl"] and built["cuda"] and built["gloo"], "not the NCCL (GPU) build of Horovod"
PY
  [ -x "$bin/horovodrun" ] || { echo "error: no horovodrun beside $python"; return 1; }
}

# Each rank allreduces tensors on its own GPU, /gpu:<local_rank>, as a sum and
# an average (Horovod's scaling kernel), and a group of two (its fused batch
# copy kernels), and checks the results. NCCL_DEBUG=INFO makes NCCL log its
# setup: the lines "NCCL INFO" show that NCCL, not Gloo, moved the GPU tensors.
allreduce_nccl() {
  cat >"$out/allreduce.py" <<'PY'
import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf

hvd.init()
for gpu in tf.config.list_physical_devices("GPU"):
    tf.config.experimental.set_memory_growth(gpu, True)
rank, size, device = hvd.rank(), hvd.size(), f"/gpu:{hvd.local_rank()}"
with tf.device(device):
    x = tf.fill([1000], float(rank + 1))
    y = tf.fill([17], float(10 * (rank + 1)))
    total = hvd.allreduce(x, op=hvd.Sum)
    mean = hvd.allreduce(x, op=hvd.Average)
    gx, gy = hvd.grouped_allreduce([x, y], op=hvd.Sum)
ranks = sum(range(1, size + 1))
checks = {
    "sum": np.allclose(total.numpy(), ranks),
    "average": np.allclose(mean.numpy(), ranks / size),
    "grouped": np.allclose(gx.numpy(), ranks) and np.allclose(gy.numpy(), 10 * ranks),
    "on the GPU": "GPU" in total.device,
}
print(f"rank {rank}/{size} on {device} ({total.device}): nccl_built={hvd.nccl_built()}", checks)
assert all(checks.values()), checks
PY
  NCCL_DEBUG=INFO "$bin/horovodrun" -np 2 -H localhost:2 --gloo \
    "$python" "$out/allreduce.py"
}

nccl_was_used() {
  local lines
  lines=$(grep -c "NCCL INFO" "$allreduce_log" || true)
  echo "NCCL log lines from the allreduce: $lines"
  [ "$lines" -gt 0 ] || { echo "error: NCCL logged nothing: the allreduce did not go through NCCL"; return 1; }
  grep -m3 "NCCL INFO" "$allreduce_log"
}

echo "GPU check with $python; logs and reports in $out"
step "the NVIDIA driver sees at least 2 GPUs (nvidia-smi)" gpus_and_driver
step "TensorFlow sees the GPUs (replicate devices)" devices
step "Horovod is the NCCL build (nccl_built, cuda_built, gloo_built)" horovod_build
step "a 2-GPU allreduce through NCCL (horovodrun -np 2 -H localhost:2)" allreduce_nccl
allreduce_log=$log
step "NCCL did the allreduce (NCCL_DEBUG=INFO lines)" nccl_was_used
# shellcheck disable=SC2086  # BENCH_FLAGS is a list of flags
step "the demo trains on 2 GPUs (replicate demo --devices 2)" \
  replicate demo --devices 2 --output "$out/digits_convnet.keras"
# shellcheck disable=SC2086
step "scaling benchmark (replicate-bench scaling $bench_flags)" \
  replicate_bench scaling $bench_flags --output "$out/benchmarks"
# shellcheck disable=SC2086
step "optimizer benchmark (replicate-bench optimizers $bench_flags)" \
  replicate_bench optimizers $bench_flags --output "$out/benchmarks"
echo
echo "all $step checks passed; logs and reports in $out"
