"""replicate's benchmark suite: scaling against peers, Keras against native optimizers.

Run it as `replicate-bench`, or `python -m benchmarks` from a checkout.
"""
