"""What each process of tests/test_cluster_managers.py runs, with a manager's TF_CONFIG.

Usage: tf_config_worker.py OUTPUT_DIR

Only TF_CONFIG says who the process is (no RANK or WORLD_SIZE, as under a
cluster manager). It trains a small model for 2 epochs on its shard with the
collective backend and writes `<type>_<index>.json` (rank, size, is_chief) and
`<type>_<index>.npz` (the final weights). A process that the backend refuses
prints the error and exits with status 3.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import model_zoo  # noqa: E402
import numpy as np  # noqa: E402

import replicate  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    task = json.loads(os.environ["TF_CONFIG"])["task"]
    name = f"{task['type']}_{task['index']}"
    replicate.simulate_devices(2)
    try:
        backend = replicate.get_backend("collective")
    except ValueError as error:
        print(f"refused: {error}", file=sys.stderr, flush=True)
        sys.exit(3)
    model = model_zoo.mlp(seed=100 + backend.rank)  # the broadcast from rank 0 wins
    parallel = replicate.replicate(model, backend=backend)
    model_zoo.compile_classifier(parallel, keras.optimizers.SGD(0.1))
    rng = np.random.default_rng(3)
    x = rng.normal(size=(48, 6)).astype("float32")
    y = rng.integers(0, 3, 48).astype("int32")
    x_mine, y_mine = replicate.shard((x, y))
    history = parallel.fit(x_mine, y_mine, batch_size=8, epochs=2, shuffle=False, verbose=0)
    np.savez(out / f"{name}.npz", *model.get_weights())
    result = {
        "rank": backend.rank,
        "size": backend.size,
        "is_chief": replicate.is_chief(),
        "loss": history.history["loss"],
    }
    (out / f"{name}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
