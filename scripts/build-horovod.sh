#!/usr/bin/env bash
# Installs Horovod 0.28.1 (TensorFlow ops) into a virtual environment, building it
# once against the installed TensorFlow and caching the wheel, so later runs
# install in seconds instead of compiling again.
#
# Usage: scripts/build-horovod.sh [VENV]
#          CPU build (Gloo, no MPI) into VENV (default .venv).
#        scripts/build-horovod.sh --gpu [--tensorflow-from DIR] [VENV]
#          GPU build (NCCL for GPU tensors, Gloo for the rest, no MPI) into VENV
#          (default .venv-gpu). A VENV that does not exist yet is created with a
#          .pth file that shares the TensorFlow of the environment DIR (default
#          .venv), whose own Horovod stays as it is. Needs no GPU, to build or to
#          import.
#        scripts/build-horovod.sh --help
# Environment: HOROVOD_WHEEL_CACHE overrides the cache folder
#              (default ~/.cache/replicate/horovod). For --gpu also:
#              HOROVOD_CUDA_HOME, a CUDA 12 toolkit to compile with (default
#              /usr/local/cuda when its nvcc is CUDA 12, else pip packages), and
#              HOROVOD_BUILD_CUDA_CC_LIST, the GPU architectures (e.g. 80,90).
set -euo pipefail

usage() {
  sed -n '/^# Usage:/,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

gpu=0
tf_from=
venv=
while [ $# -gt 0 ]; do
  case $1 in
    --gpu) gpu=1 ;;
    --tensorflow-from)
      [ $# -ge 2 ] || { echo "error: --tensorflow-from needs a folder" >&2; exit 2; }
      tf_from=$2
      shift
      ;;
    -h | --help) usage; exit 0 ;;
    -*) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
    *)
      [ -z "$venv" ] || { echo "error: more than one VENV given ($venv, $1)" >&2; exit 2; }
      venv=$1
      ;;
  esac
  shift
done
if [ "$gpu" = 0 ] && [ -n "$tf_from" ]; then
  echo "error: --tensorflow-from goes with --gpu" >&2
  exit 2
fi

version=0.28.1

# The compilers, and the headers that TensorFlow 2.21's XLA headers include.
ensure_debian_packages() {
  local need=() pkg
  for pkg in libhighwayhash-dev libfarmhash-dev cmake g++; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
  done
  if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
      echo "error: the Horovod build needs the Debian packages: ${need[*]}; install them (as root) and run again" >&2
      exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
}

# --gpu: Horovod with HOROVOD_GPU_OPERATIONS=NCCL, built from the sdist with two
# source edits (below), into its own wheel cache folder (…-cuda12-nccl).
build_gpu() {
  venv=${venv:-.venv-gpu}
  tf_from=${tf_from:-.venv}
  local py="$venv/bin/python"
  export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}

  # The environment: a new one sees the TensorFlow (and the rest) of $tf_from
  # through a .pth file; what is installed in $venv itself comes first on
  # sys.path, so its Horovod hides the CPU one of $tf_from.
  if [ ! -x "$py" ]; then
    if [ ! -x "$tf_from/bin/python" ]; then
      echo "error: $venv does not exist, and $tf_from has no bin/python to share TensorFlow from (run make install, or pass --tensorflow-from)" >&2
      exit 1
    fi
    echo "creating $venv, which shares the TensorFlow of $tf_from"
    "$tf_from/bin/python" -m venv "$venv"
    local tf_site site
    tf_site=$("$tf_from/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    realpath "$tf_site" >"$site/replicate-shared-tensorflow.pth"
  fi
  if ! "$py" -c 'import tensorflow' 2>/dev/null; then
    echo "error: TensorFlow cannot be imported by $py" >&2
    exit 1
  fi

  if "$py" - <<'PY' 2>/dev/null; then
import horovod, horovod.tensorflow as hvd
assert horovod.__version__ == "0.28.1"
assert hvd.gloo_built() and hvd.nccl_built() and hvd.cuda_built()
PY
    echo "horovod $version with NCCL and Gloo is already installed in $venv"
    return 0
  fi

  local tf_version py_tag site cache
  tf_version=$("$py" -c 'import tensorflow as tf; print(tf.__version__)')
  py_tag=$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')
  cache=${HOROVOD_WHEEL_CACHE:-$HOME/.cache/replicate/horovod}/tf-$tf_version-$py_tag-cuda12-nccl
  mkdir -p "$cache"

  # Needed at import time, so installed into $venv: NCCL, the pip package (and
  # version range) that tensorflow[and-cuda] 2.21 uses. Horovod's library finds
  # libnccl.so.2 through its RUNPATH, $ORIGIN/../../nvidia/nccl/lib, so it must
  # sit in the same site-packages as horovod/ (no LD_LIBRARY_PATH needed). The
  # CUDA runtime calls resolve to libtensorflow_framework.so.2, whose stub
  # loads the libcudart.so.12 that TensorFlow itself uses. Then the build's own
  # Python needs (no build isolation: it must see TensorFlow).
  local runtime="nvidia-nccl-cu12>=2.27.7,<3"
  "$py" -m pip install --quiet "$runtime"
  if [ ! -e "$site/nvidia/nccl/lib/libnccl.so.2" ]; then
    "$py" -m pip install --quiet --no-deps --ignore-installed "$runtime"
  fi
  "$py" -m pip install --quiet "packaging" "psutil" "pyyaml" "cloudpickle" "cffi>=1.4.0" "setuptools<81" "wheel"

  if ! ls "$cache"/horovod-$version-*.whl >/dev/null 2>&1; then
    ensure_debian_packages
    local work
    work=$(mktemp -d)
    # shellcheck disable=SC2064  # expand $work now
    trap "rm -rf '$work'" EXIT

    # The CUDA compiler and headers, used for the build only. A CUDA 12 toolkit
    # when there is one (the nvidia/cuda devel images have /usr/local/cuda).
    # Otherwise from pip, into $work: NVIDIA's CUDA 12 pip packages hold the
    # runtime headers and libcudart.so.12 (12.5, as TensorFlow 2.21) and CCCL,
    # but no nvcc (nvidia-cuda-nvcc-cu12 has only ptxas and libnvvm), so the
    # compiler driver is CUDA 13.0's (nvidia-cuda-nvcc, -crt, nvvm). It compiles
    # only Horovod's small kernels (cuda_kernels.cu) against the CUDA 12.5
    # headers, and they run on TensorFlow's CUDA 12 runtime. Kernels built by
    # CUDA 13 likely need an NVIDIA driver of release 580 or later.
    local cuda_home=${HOROVOD_CUDA_HOME:-} cuda_flags=
    if [ -z "$cuda_home" ] && [ -x /usr/local/cuda/bin/nvcc ] &&
      /usr/local/cuda/bin/nvcc --version | grep -q 'release 12\.'; then
      cuda_home=/usr/local/cuda
    fi
    if [ -n "$cuda_home" ]; then
      [ -x "$cuda_home/bin/nvcc" ] || { echo "error: no bin/nvcc in HOROVOD_CUDA_HOME=$cuda_home" >&2; exit 1; }
    else
      echo "fetching the CUDA compiler and CUDA 12.5 headers from PyPI (build only, into $work)"
      "$py" -m pip install --quiet --no-deps --target "$work/pip" \
        "nvidia-cuda-nvcc==13.0.88" "nvidia-cuda-crt==13.0.88" "nvidia-nvvm==13.0.88" \
        "nvidia-cuda-runtime==13.0.88" \
        "nvidia-cuda-runtime-cu12==12.5.82" "nvidia-cuda-cccl-cu12==12.5.39.post1"
      # One toolkit folder, the layout nvcc and CMake expect: nvcc's own bin/,
      # nvvm/ and include/crt/, plus the CUDA 12.5 headers and libcudart.so.12
      # (to link CMake's compiler check against).
      # Of CUDA 13's runtime only libcudadevrt.a is kept: nvcc device-links the
      # test program of CMake's compiler check with it (Horovod's library does
      # not use it).
      cuda_home=$work/pip/nvidia/cu13
      cp -rn "$work/pip/nvidia/cuda_runtime/include/." "$work/pip/nvidia/cuda_cccl/include/." "$cuda_home/include/"
      mkdir -p "$cuda_home/lib64"
      mv "$cuda_home/lib/libcudadevrt.a" "$cuda_home/lib64/"
      rm -f "$cuda_home"/lib/libcudart*
      cp "$work/pip/nvidia/cuda_runtime/lib/libcudart.so.12" "$cuda_home/lib64/"
      ln -s libcudart.so.12 "$cuda_home/lib64/libcudart.so"
      # The shared CUDA runtime for CMake's compiler check too, and uncompressed
      # fat binaries (loadable by any driver that runs the code).
      cuda_flags="--cudart=shared --compress-mode=none"
    fi
    local nvcc_version cc_list cc
    nvcc_version=$("$cuda_home/bin/nvcc" --version | grep -o 'release [0-9.]*, V[0-9.]*')
    cc_list=${HOROVOD_BUILD_CUDA_CC_LIST:-}
    if [ -z "$cc_list" ]; then
      # Volta to Blackwell, as far as this nvcc goes (CUDA 13 dropped Volta).
      for cc in 70 75 80 86 89 90 100 120; do
        if "$cuda_home/bin/nvcc" --list-gpu-arch | grep -qx "compute_$cc"; then cc_list+=${cc_list:+,}$cc; fi
      done
    fi

    # NCCL: the headers and libnccl.so.2 of the nvidia-nccl-cu12 package just
    # installed, linked as a shared library (the package has no static one).
    local nccl
    nccl=$("$py" -c 'import importlib.util as u; print(list(u.find_spec("nvidia.nccl").submodule_search_locations)[0])')
    mkdir -p "$work/nccl-lib"
    ln -s "$nccl/lib/libnccl.so.2" "$work/nccl-lib/libnccl.so"

    # CMake settings Horovod has no variable for, given as a toolchain file
    # (CMake >= 3.21 reads CMAKE_TOOLCHAIN_FILE from the environment): the shared
    # CUDA runtime, not Horovod's default static one (which the pip packages do
    # not have, and which would be a second CUDA runtime beside TensorFlow's),
    # and a RUNPATH that finds NCCL in site-packages/nvidia.
    cat >"$work/toolchain.cmake" <<'CMAKE'
set(CMAKE_CUDA_RUNTIME_LIBRARY Shared)
set(CMAKE_BUILD_WITH_INSTALL_RPATH ON)
set(CMAKE_INSTALL_RPATH "$ORIGIN/../../nvidia/nccl/lib")
CMAKE

    # Horovod's source, to edit: the released sdist, unpacked into $work.
    "$py" -m pip download --quiet --no-binary :all: --no-deps "horovod==$version" -d "$work"
    tar -xzf "$work/horovod-$version.tar.gz" -C "$work"
    local src=$work/horovod-$version
    "$py" - "$src" <<'PY'
# The two source edits a GPU build against TensorFlow 2.21 needs. Each must
# match exactly as often as stated, or the build stops.
import pathlib
import sys

src = pathlib.Path(sys.argv[1])


def edit(rel, old, new, count, why):
    path = src / rel
    text = path.read_text()
    found = text.count(old)
    if found != count:
        sys.exit(
            f"error: cannot edit {rel}: expected {count} match(es) of "
            f"{old.strip().splitlines()[0]!r}..., found {found}"
        )
    path.write_text(text.replace(old, new))
    print(f"edited {rel}: {why}")


# (a) Horovod forward-declares stream_executor::gpu::AsGpuStreamValue and lets
# TensorFlow's library provide it. TensorFlow 2.21 no longer exports it, so the
# import fails with "undefined symbol:
# _ZN15stream_executor3gpu16AsGpuStreamValueEPNS_6StreamE". Define it here
# instead, after stream.h, from the stream's platform-specific handle (the
# CUstream that the old function returned).
edit(
    "horovod/tensorflow/mpi_ops.cc",
    """// Forward declaration of AsGpuStreamValue
namespace stream_executor {
namespace gpu {
GpuStreamHandle AsGpuStreamValue(Stream* stream);
} // namespace stream_executor
} // namespace gpu
#if TENSORFLOW_VERSION >= 2011000000
#include "tensorflow/compiler/xla/stream_executor/stream.h"
#else
#include "tensorflow/stream_executor/stream.h"
#endif // TENSORFLOW_VERSION >= 2011000000
""",
    """#if TENSORFLOW_VERSION >= 2011000000
#include "tensorflow/compiler/xla/stream_executor/stream.h"
#else
#include "tensorflow/stream_executor/stream.h"
#endif // TENSORFLOW_VERSION >= 2011000000
// Edited by replicate's scripts/build-horovod.sh: TensorFlow 2.21 does not
// export AsGpuStreamValue, so it is defined here from the stream's handle.
namespace stream_executor {
namespace gpu {
inline GpuStreamHandle AsGpuStreamValue(Stream* stream) {
  return static_cast<GpuStreamHandle>(stream->platform_specific_handle().stream);
}
} // namespace gpu
} // namespace stream_executor
""",
    1,
    "AsGpuStreamValue defined locally (TensorFlow 2.21 does not export it)",
)

# (b) The GPU part of the XLA ops names ::xla::StatusOr, which XLA has dropped
# for absl::StatusOr (it no longer compiles with HAVE_GPU).
edit(
    "horovod/tensorflow/xla_mpi_ops.cc",
    "::xla::StatusOr",
    "absl::StatusOr",
    2,
    "::xla::StatusOr -> absl::StatusOr (XLA dropped its alias)",
)
PY

    # Of the five XLA headers the CPU build forwards (see below), only this one
    # is missing from TensorFlow 2.21's include tree for the GPU build.
    mkdir -p "$work/shim/tensorflow/compiler/xla/client"
    printf '#include "%s"\n' xla/hlo/builder/xla_builder.h >"$work/shim/tensorflow/compiler/xla/client/xla_builder.h"

    echo "building horovod $version with NCCL against tensorflow $tf_version" \
      "(nvcc $nvcc_version, GPU architectures $cc_list; about 3-5 minutes on 2 cores)"
    HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
    HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_CPU_OPERATIONS=gloo \
    HOROVOD_GPU=CUDA HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_CUDA_HOME="$cuda_home" \
    HOROVOD_BUILD_CUDA_CC_LIST="$cc_list" HOROVOD_NCCL_LINK=SHARED \
    HOROVOD_NCCL_INCLUDE="$nccl/include" HOROVOD_NCCL_LIB="$work/nccl-lib" \
    CMAKE_TOOLCHAIN_FILE="$work/toolchain.cmake" CUDAFLAGS="$cuda_flags" \
    MAKEFLAGS="-j$(nproc)" CPATH="$work/shim${CPATH:+:$CPATH}" \
      "$py" -m pip wheel --quiet --no-build-isolation --no-deps "$src" -w "$work/wheel"
    mv "$work"/wheel/horovod-$version-*.whl "$cache/"
    printf 'horovod %s, tensorflow %s, nvcc %s (%s), GPU architectures %s, NCCL headers %s\n' \
      "$version" "$tf_version" "$nvcc_version" "$cuda_home" "$cc_list" \
      "$(grep -m1 -o 'NCCL_VERSION_CODE [0-9]*' "$nccl/include/nccl.h")" >"$cache/BUILD-INFO.txt"
  fi

  "$py" -m pip install --quiet --no-deps --force-reinstall "$cache"/horovod-$version-*.whl
  "$py" - <<'PY'
import horovod.tensorflow as hvd

built = {f"{name}_built": bool(getattr(hvd, f"{name}_built")()) for name in ("nccl", "cuda", "gloo")}
print("horovod 0.28.1 installed:", " ".join(f"{k}={v}" for k, v in built.items()))
assert all(built.values()), "the GPU build of Horovod lacks NCCL, CUDA or Gloo"
PY
}

if [ "$gpu" = 1 ]; then
  build_gpu
  exit 0
fi

# The CPU build (default).
venv=${venv:-.venv}
py="$venv/bin/python"

if "$py" - <<'PY' 2>/dev/null; then
import horovod, horovod.tensorflow as hvd
assert horovod.__version__ == "0.28.1" and hvd.gloo_built()
PY
  echo "horovod $version with Gloo is already installed in $venv"
  exit 0
fi

tf_version=$("$py" -c 'import tensorflow as tf; print(tf.__version__)')
py_tag=$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
cache=${HOROVOD_WHEEL_CACHE:-$HOME/.cache/replicate/horovod}/tf-$tf_version-$py_tag
mkdir -p "$cache"

# The build's own Python needs (no build isolation: it must see TensorFlow).
"$venv/bin/pip" install --quiet "packaging" "psutil" "pyyaml" "cloudpickle" "cffi>=1.4.0" "setuptools<81" "wheel"

if ! ls "$cache"/horovod-$version-*.whl >/dev/null 2>&1; then
  echo "building horovod $version against tensorflow $tf_version (about 2-4 minutes on 2 cores)"
  # TensorFlow 2.21's XLA headers include these two libraries' headers.
  ensure_debian_packages

  # Horovod 0.28.1 includes five XLA headers by their pre-2.16 paths; forward
  # each old path to where TensorFlow 2.21 keeps the header now.
  shim=$(mktemp -d)
  trap 'rm -rf "$shim"' EXIT
  while read -r old new; do
    mkdir -p "$shim/$(dirname "$old")"
    printf '#include "%s"\n' "$new" >"$shim/$old"
  done <<'MAP'
tensorflow/compiler/xla/client/xla_builder.h xla/hlo/builder/xla_builder.h
tensorflow/compiler/xla/service/custom_call_target_registry.h xla/service/custom_call_target_registry.h
tensorflow/compiler/xla/service/hlo.pb.h xla/service/hlo.pb.h
tensorflow/compiler/xla/shape.h xla/shape.h
tensorflow/compiler/xla/xla_data.pb.h xla/xla_data.pb.h
MAP

  HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
  HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_CPU_OPERATIONS=gloo \
  MAKEFLAGS="-j$(nproc)" CPATH="$shim${CPATH:+:$CPATH}" \
    "$venv/bin/pip" wheel --quiet --no-build-isolation --no-deps "horovod==$version" -w "$cache"
fi

"$venv/bin/pip" install --quiet --no-deps --force-reinstall "$cache"/horovod-$version-*.whl
"$py" -c 'import horovod.tensorflow as hvd; assert hvd.gloo_built(); print("horovod", hvd.__version__ if hasattr(hvd, "__version__") else "0.28.1", "with Gloo installed")'
