# replicate, CPU image: Python 3.11 on Debian 12 (bookworm), TensorFlow 2.21.0,
# the replicate package, and Horovod 0.28.1 built from source with Gloo (no MPI)
# by scripts/build-horovod.sh. It runs the `local` backend (towers) on simulated CPU
# devices and the `horovod` backend across processes or machines.
#
# Build, from the repository root (the Horovod compile takes a few minutes):
#
#   docker build -f docker/cpu.Dockerfile -t replicate:cpu .
#
# Try it on one machine:
#
#   docker run --rm replicate:cpu                          # replicate devices
#   docker run --rm replicate:cpu replicate demo --devices 2
#   docker run --rm replicate:cpu \
#     horovodrun --gloo -np 2 -H localhost:2 python examples/train_digits.py --backend horovod
#
# Train across two hosts (host1, host2), one process on each:
#
#   1. Make one ssh key pair for the cluster and put it, with an authorized_keys
#      that holds its public half, in a folder owned by root on both hosts:
#        sudo install -d -m 700 /etc/replicate/ssh
#        sudo ssh-keygen -t ed25519 -N '' -f /etc/replicate/ssh/id_ed25519
#        sudo cp /etc/replicate/ssh/id_ed25519.pub /etc/replicate/ssh/authorized_keys
#      (copy the same three files to host2, keeping owner root and mode 600)
#   2. On each host, start a container that shares the host's network and runs
#      an ssh server on a free port (12345 here); host keys are made at start:
#        docker run -d --name replicate --network host \
#          -v /etc/replicate/ssh:/root/.ssh:ro replicate:cpu \
#          bash -c 'ssh-keygen -A && exec /usr/sbin/sshd -D -p 12345'
#   3. On host1, launch the job; horovodrun reaches both containers over ssh:
#        docker exec -it replicate horovodrun --gloo -np 2 -H host1:1,host2:1 \
#          -p 12345 python examples/train_digits.py --backend horovod
#      On machines with several network interfaces, add
#      --network-interface <name> so that Gloo uses the one the hosts share.
#
# Every process runs in /app, the same folder in every container, so paths on
# the command line mean the same thing on both hosts.

FROM python:3.11.13-slim-bookworm

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The Horovod build needs a C++ toolchain and cmake, and TensorFlow 2.21's XLA
# headers include highwayhash and farmhash headers (see scripts/build-horovod.sh).
# horovodrun starts the remote processes over ssh, so both the client and a
# server are installed; the server's host keys are made when a container starts.
# Versions are not pinned: the packages follow the bookworm point releases.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
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

RUN python -m venv /opt/venv \
    && pip install --no-cache-dir "setuptools>=61,<81" "wheel>=0.40"

# TensorFlow first, and Horovod built against it, so that editing the project
# does not recompile Horovod. The TensorFlow version is the one the build was
# made for; scripts/build-horovod.sh keys its wheel on it.
RUN pip install --no-cache-dir "tensorflow==2.21.0"

WORKDIR /app
COPY scripts/build-horovod.sh scripts/build-horovod.sh
RUN HOROVOD_WHEEL_CACHE=/tmp/horovod-wheels bash scripts/build-horovod.sh /opt/venv \
    && rm -rf /tmp/horovod-wheels

COPY setup.cfg setup.py pyproject.toml README.md ./
COPY replicate/ replicate/
RUN pip install --no-cache-dir --no-build-isolation "./[demo]" \
    && rm -rf build keras_replicate.egg-info

COPY scripts/ scripts/
COPY examples/ examples/
COPY benchmarks/ benchmarks/

CMD ["replicate", "devices"]
