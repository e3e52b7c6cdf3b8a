"""One benchmark process: `python -m replicate.bench.worker '<json spec>'`.

Sets the devices up before TensorFlow starts, builds the contenders the spec
names, times them interleaved and prints one marked JSON line.
"""

from __future__ import annotations

import json
import os
import sys


def _devices(count: int) -> list[str]:
    import tensorflow as tf

    import replicate

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        if count > len(gpus):
            raise SystemExit(f"asked for {count} devices, this machine has {len(gpus)} GPUs")
        return [f"/gpu:{i}" for i in range(count)]
    return replicate.simulate_devices(count)


def main(argv: list[str]) -> None:
    spec = json.loads(argv[0])
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if spec["kind"] == "processes":
        from replicate.bench import scaling

        scaling.process_worker(spec)
        return
    if spec["kind"] == "profile":
        from replicate.bench import profile

        profile.worker(spec)
        return
    if spec["kind"] in ("consistency", "agreement"):
        from replicate.bench import checks

        worker = (
            checks.consistency_worker if spec["kind"] == "consistency" else checks.agreement_worker
        )
        worker(spec)
        return
    devices = _devices(spec["devices"])
    if spec["kind"] == "scaling":
        from replicate.bench import scaling

        scaling.worker(spec, devices)
    elif spec["kind"] == "optimizers":
        from replicate.bench import optimizers

        optimizers.worker(spec, devices)
    elif spec["kind"] == "startup":
        from replicate.bench import startup

        startup.startup_worker(spec, devices)
    elif spec["kind"] == "overhead":
        from replicate.bench import startup

        startup.overhead_worker(spec, devices)
    elif spec["kind"] == "precision":
        from replicate.bench import checks

        checks.precision_worker(spec, devices)
    else:
        raise SystemExit(f"unknown worker kind {spec['kind']!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
