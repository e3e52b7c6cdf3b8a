#!/usr/bin/env bash
# Installs Horovod 0.28.1 (TensorFlow ops, Gloo, CPU) into the project's virtual
# environment, building it once against the installed TensorFlow and caching the
# wheel, so later runs install in seconds instead of compiling again.
#
# Usage: scripts/build-horovod.sh [VENV]     (default .venv)
# Environment: HOROVOD_WHEEL_CACHE overrides the cache folder
#              (default ~/.cache/replicate/horovod).
set -euo pipefail

venv=${1:-.venv}
py="$venv/bin/python"
version=0.28.1

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
  need=()
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
