"""What each process of tests/test_security.py runs: train one step, then report what listens.

Usage: listen_worker.py BACKEND OUTPUT_DIR [HOLD_SECONDS]

BACKEND is "collective" (under `replicate launch`) or "horovod" (under
`horovodrun`). After one training step (so every connection of the backend is
up), each process writes `listen_rank<R>.json`: the TCP sockets in LISTEN state
that it owns, read from /proc (no tool needed). Then it stays alive until
OUTPUT_DIR/release exists or HOLD_SECONDS pass, so that the launcher's sockets
can be read meanwhile (by the test, or with `ss -ltnp` by hand).
"""

import json
import os
import socket
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import model_zoo  # noqa: E402
import numpy as np  # noqa: E402

import replicate  # noqa: E402

LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp


def _address(hex_address: str, family: int) -> tuple[str, int]:
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    if family == socket.AF_INET:
        raw = raw[::-1]
    else:  # /proc/net/tcp6 stores four 32-bit words, each little-endian
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(family, raw), int(port, 16)


def listening_sockets(pid: int) -> list[list]:
    """`[host, port]` of every TCP socket in LISTEN state that process `pid` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = []
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        table = Path(f"/proc/{pid}/net/{name}")
        if not table.exists():
            continue
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == LISTEN and fields[9] in inodes:
                found.append(list(_address(fields[1], family)))
    return sorted(found)


def main() -> None:
    backend_name, out = sys.argv[1], Path(sys.argv[2])
    hold = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    replicate.simulate_devices(1)
    backend = replicate.get_backend(backend_name)
    model = model_zoo.mlp(seed=backend.rank)
    parallel = replicate.replicate(model, backend=backend)
    model_zoo.compile_classifier(parallel, keras.optimizers.SGD(0.1))
    x, y = np.ones((8, 6), "float32"), np.zeros(8, "int32")
    parallel.fit(x, y, batch_size=8, epochs=1, verbose=0)
    report = {
        "rank": backend.rank,
        "pid": os.getpid(),
        "tf_config": os.environ.get("TF_CONFIG"),
        "listen": listening_sockets(os.getpid()),
    }
    (out / f"listen_rank{backend.rank}.json").write_text(json.dumps(report, indent=1))
    deadline = time.monotonic() + hold
    while time.monotonic() < deadline and not (out / "release").exists():
        time.sleep(0.2)


if __name__ == "__main__":
    main()
