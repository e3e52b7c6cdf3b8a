"""replicate's benchmark suite: `python -m benchmarks {scaling,optimizers}`."""
