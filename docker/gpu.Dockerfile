# replicate, GPU image: CUDA 12.5 with cuDNN 9 on Ubuntu 22.04, Python 3.11,
# tensorflow[and-cuda]==2.21.0 (the TensorFlow 2.21.0 wheel is built against
# CUDA 12.5 and cuDNN 9), the replicate package, and Horovod 0.28.1 built from
# source by `scripts/build-horovod.sh --gpu`: NCCL for GPU collectives, Gloo for
# the rest, no MPI. The script compiles with the image's nvcc 12.5, links the
# NCCL of the nvidia-nccl-cu12 package that TensorFlow uses, and makes the two
# edits to Horovod's source that TensorFlow 2.21 needs (see the script).
#
# Build, from the repository root (the Horovod compile takes several minutes):
#
#   docker build -f docker/gpu.Dockerfile -t replicate:gpu .
#
# To build faster, compile Horovod's kernels only for the cluster's GPUs (e.g.
# --build-arg HOROVOD_BUILD_CUDA_CC_LIST=90 for H100s); for one machine with
# several GPUs, where the `local` backend needs no Horovod, skip it altogether
# with --build-arg WITH_HOROVOD=0.
#
# First checks on a GPU machine (nvidia-smi, devices, a 2-GPU NCCL allreduce
# under horovodrun, the demo, benchmarks), stopping at the first failure:
#
#   docker run --rm --gpus all --ipc host replicate:gpu scripts/gpu-check.sh /tmp/gpu-check
#
# Try it on one machine (needs the NVIDIA container runtime on the host):
#
#   docker run --rm --gpus all replicate:gpu                  # replicate devices
#   docker run --rm --gpus all replicate:gpu replicate demo --devices 2
#
# Train across two hosts (host1, host2) with 4 GPUs each, one process per GPU
# (one tower each: --devices 1; or -H host1:2,host2:2 with --devices 2):
#
#   1. Make one ssh key pair for the cluster and put it, with an authorized_keys
#      that holds its public half, in a folder owned by root on both hosts:
#        sudo install -d -m 700 /etc/replicate/ssh
#        sudo ssh-keygen -t ed25519 -N '' -f /etc/replicate/ssh/id_ed25519
#        sudo cp /etc/replicate/ssh/id_ed25519.pub /etc/replicate/ssh/authorized_keys
#      (copy the same three files to host2, keeping owner root and mode 600)
#   2. On each host, start a container that shares the host's network and IPC
#      namespace (NCCL uses shared memory) and runs an ssh server on a free
#      port (12345 here); host keys are made at start:
#        docker run -d --name replicate --gpus all --network host --ipc host \
#          -v /etc/replicate/ssh:/root/.ssh:ro replicate:gpu \
#          bash -c 'ssh-keygen -A && exec /usr/sbin/sshd -D -p 12345'
#   3. On host1, launch the job; horovodrun reaches both containers over ssh:
#        docker exec -it replicate horovodrun -np 8 -H host1:4,host2:4 \
#          -p 12345 python examples/train_digits.py --backend horovod --devices 1
#      On machines with several network interfaces, add
#      --network-interface <name> so that Gloo uses the one the hosts share.
#
# Every process runs in /app, the same folder in every container, so paths on
# the command line mean the same thing on both hosts.

FROM nvidia/cuda:12.5.1-cudnn-devel-ubuntu22.04

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Python 3.11 from Ubuntu 22.04's own archive (its default python3 is 3.10).
# The Horovod build needs a C++ toolchain and cmake, and TensorFlow 2.21's XLA
# headers include highwayhash and farmhash headers (see scripts/build-horovod.sh);
# nvcc comes with the devel base image, NCCL with tensorflow[and-cuda].
# horovodrun starts the remote processes over ssh, so both the client and a
# server are installed; the server's host keys are made when a container starts.
# Versions are not pinned: the packages follow the Ubuntu 22.04 updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3.11 \
        python3.11-dev \
        python3.11-venv \
        cmake \
        g++ \
        make \
        libhighwayhash-dev \
        libfarmhash-dev \
        openssh-client \
        openssh-server \
    && rm -rf /var/lib/apt/lists/* \
    && rm -f /etc/ssh/ssh_host_* \
    && mkdir -p /run/sshd \
    && printf '%s\n' 'Host *' '    UserKnownHostsFile /dev/null' '    LogLevel ERROR' \
        > /etc/ssh/ssh_config.d/replicate.conf

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2

RUN python3.11 -m venv /opt/venv \
    && pip install --no-cache-dir --upgrade "pip>=23" "setuptools>=61,<81" "wheel>=0.40"

# TensorFlow first, and Horovod built against it, so that editing the project
# does not recompile Horovod. The and-cuda extra brings the CUDA 12 and cuDNN 9
# libraries TensorFlow loads at run time as pip packages.
RUN pip install --no-cache-dir "tensorflow[and-cuda]==2.21.0"

# WITH_HOROVOD=0 skips the Horovod build (the `local` backend does not need it).
# HOROVOD_BUILD_CUDA_CC_LIST: compute capabilities Horovod's CUDA kernels are
# compiled for (Volta through Hopper); narrow it to the cluster's GPUs to build
# faster, or widen it for other cards. Build arguments are in the environment of
# the RUN below, so the Horovod build sees it.
ARG WITH_HOROVOD=1
ARG HOROVOD_BUILD_CUDA_CC_LIST=70,75,80,86,89,90

WORKDIR /app
COPY scripts/build-horovod.sh scripts/build-horovod.sh
# The script uses the CUDA 12 toolkit in /usr/local/cuda, builds the wheel into
# a cache folder (removed afterwards), installs it into /opt/venv and checks
# that it imports with nccl_built(), cuda_built() and gloo_built().
RUN if [ "$WITH_HOROVOD" = 1 ]; then \
        HOROVOD_WHEEL_CACHE=/tmp/horovod-wheels \
            bash scripts/build-horovod.sh --gpu /opt/venv \
        && rm -rf /tmp/horovod-wheels; \
    fi

COPY setup.cfg setup.py pyproject.toml README.md ./
COPY replicate/ replicate/
RUN pip install --no-cache-dir --no-build-isolation "./[demo]" \
    && rm -rf build keras_replicate.egg-info

COPY scripts/ scripts/
COPY examples/ examples/
COPY benchmarks/ benchmarks/

CMD ["replicate", "devices"]
