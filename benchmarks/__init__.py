"""`python -m benchmarks` from a checkout runs replicate's benchmark suite (replicate.bench)."""
