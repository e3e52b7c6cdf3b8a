"""`replicate launch`: the processes of one job on this machine, each with its `TF_CONFIG`.

One machine: `replicate launch --nproc 2 -- python train.py` (or, as with
`torchrun`, `replicate launch --nproc 2 train.py`) starts two
processes on free ports of the loopback interface: their `TF_CONFIG` names
`127.0.0.1:<port>`, so the processes reach one another over loopback only.
TensorFlow's gRPC server itself listens on every interface, `[::]:<port>`
(IPv6 and IPv4), whatever host `TF_CONFIG` names (TensorFlow offers no choice
of address), so on a shared network firewall those ports; the README's
Security section measures this.
Several machines: run the same command on
each, naming all hosts in the same order and this host's place among them,
`replicate launch --nproc 2 --hosts a,b --node-rank 0 --port 29400 -- python
train.py` on `a` and `--node-rank 1` on `b` (ports 29400 and up must be free
and reachable on every host).

Each process gets `TF_CONFIG` (every process of the job, as workers, rank
order), and `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`,
`REPLICATE_LAUNCH=1`; with several
processes on the host, also `TF_NUM_INTRAOP_THREADS`, `TF_NUM_INTEROP_THREADS` and
`OMP_NUM_THREADS`, each the host's cores divided among them, where not already set
(`replicate.threads`). Output
lines are prefixed with the rank. When a process fails, the launcher stops
the others and exits with the failed process's status, as `horovodrun` and
`torchrun` do.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from replicate import threads
from replicate.cluster import LAUNCHED  # set in every process it starts

# Seconds the other processes get to exit after SIGTERM, before SIGKILL.
GRACE = 10.0
# One host: every address the launcher chooses is on the loopback interface.
LOOPBACK = "127.0.0.1"


def free_ports(count: int) -> list[int]:
    """`count` TCP ports that are free on the loopback interface now."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def environments(
    nproc: int, *, hosts: Sequence[str] | None = None, node_rank: int = 0, port: int | None = None
) -> list[dict[str, str]]:
    """The environment variables of this host's `nproc` processes.

    With no `hosts`, the job is this host's alone: its addresses are free
    ports on the loopback interface (`127.0.0.1`).

    Raises:
        ValueError: For a non-positive `nproc`, a `node_rank` outside the
            hosts, or several hosts without a `port`.
    """
    if nproc < 1:
        raise ValueError(f"`nproc` must be a positive integer. Received: nproc={nproc}")
    hosts = list(hosts) if hosts else [LOOPBACK]
    if not 0 <= node_rank < len(hosts):
        raise ValueError(
            f"`node_rank` must name one of the {len(hosts)} hosts {hosts} (0 to "
            f"{len(hosts) - 1}). Received: node_rank={node_rank}"
        )
    if len(hosts) > 1 and port is None:
        raise ValueError(
            "Several hosts need a fixed `--port` (the first of `nproc` consecutive ports, "
            "free on every host), so that every host computes the same cluster."
        )
    ports = list(range(port, port + nproc)) if port is not None else free_ports(nproc)
    workers = [f"{host}:{p}" for host in hosts for p in ports]
    out = []
    for local in range(nproc):
        rank = node_rank * nproc + local
        config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": rank}}
        out.append(
            {
                "TF_CONFIG": json.dumps(config),
                "RANK": str(rank),
                "WORLD_SIZE": str(len(workers)),
                "LOCAL_RANK": str(local),
                "LOCAL_WORLD_SIZE": str(nproc),
                LAUNCHED: "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
    return out


def _relay(stream, rank: int, out) -> None:
    for line in iter(stream.readline, b""):
        out.buffer.write(f"[{rank}] ".encode() + line)
        out.flush()
    stream.close()


def _stop(processes: list[subprocess.Popen]) -> None:
    for p in processes:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + GRACE
    for p in processes:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def resolve(command: Sequence[str]) -> list[str]:
    """`command` as each process runs it, checked before any process starts.

    A Python script given by itself (`replicate launch --nproc 2 train.py`, as
    `torchrun` takes it) runs under this launcher's Python, `sys.executable`;
    any other program must be an executable file, on `PATH` or at the path given.

    Raises:
        ValueError: For an empty `command`, a script that does not exist, or a
            program that cannot be run, naming it and the form that runs it.
    """
    if not command:
        raise ValueError("No command to launch. Usage: replicate launch --nproc N -- COMMAND ...")
    program, *rest = command
    if program.endswith(".py"):
        if not os.path.isfile(program):
            what = "is a directory" if os.path.isdir(program) else "does not exist"
            raise ValueError(
                f"The script {program!r} {what} (looked in {os.getcwd()}). "
                "Usage: replicate launch --nproc N -- python train.py ..."
            )
        return [sys.executable, program, *rest]
    if shutil.which(program) is None:
        where = "at that path" if os.sep in program else "on PATH"
        raise ValueError(
            f"Cannot run {program!r}: no executable file of that name {where}. "
            "replicate launch runs one command in each process: to run a Python script, "
            "`replicate launch --nproc N -- python train.py` (or `replicate launch --nproc N "
            "train.py`)."
        )
    return [program, *rest]


def run(
    command: Sequence[str],
    nproc: int,
    *,
    hosts: Sequence[str] | None = None,
    node_rank: int = 0,
    port: int | None = None,
) -> int:
    """Runs `command` as `nproc` processes of one job; returns the job's exit status.

    Raises:
        ValueError: For a command that cannot be run (`resolve`; one the system
            cannot start, such as a script whose `#!` interpreter is missing) or bad
            cluster options; no process is left running then.
    """
    command = resolve(command)
    envs = environments(nproc, hosts=hosts, node_rank=node_rank, port=port)
    # The host's cores shared among its processes (replicate.threads), unless set.
    pools = threads.launcher_environment(nproc, dict(os.environ))
    processes, relays = [], []
    for env in envs:
        rank = int(env["RANK"])
        try:
            p = subprocess.Popen(
                list(command),
                env={**os.environ, **pools, **env},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        except OSError as error:  # no interpreter behind its #!, not a program at all
            _stop(processes)
            raise ValueError(
                f"Cannot run {command[0]!r}: {error.strerror or error} (the file is there, "
                "but the system cannot start it: a script needs a first line such as "
                "`#!/usr/bin/env python3` whose interpreter exists). To run a Python script: "
                "`replicate launch --nproc N -- python train.py`."
            ) from None
        processes.append(p)
        for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
            relay = threading.Thread(target=_relay, args=(stream, rank, out), daemon=True)
            relay.start()
            relays.append(relay)
    ranks = [int(env["RANK"]) for env in envs]

    def interrupted(signum, frame):
        _stop(processes)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, interrupted)
    status = 0
    try:
        while True:
            codes = [p.poll() for p in processes]
            failed = [(r, c) for r, c in zip(ranks, codes) if c not in (None, 0)]
            if failed:
                rank, code = failed[0]
                shown = f"signal {-code}" if code < 0 else f"status {code}"
                size = int(envs[0]["WORLD_SIZE"])
                sys.stderr.write(
                    f"replicate launch: process {rank} of {size} exited with {shown}; "
                    "stopping the other processes.\n"
                )
                sys.stderr.flush()
                _stop(processes)
                status = 128 - code if code < 0 else code
                break
            if all(c == 0 for c in codes):
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        _stop(processes)
        status = 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        for relay in relays:
            relay.join(timeout=5)
    return status
