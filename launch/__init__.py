"""Launch config sweeps of `alexnet_jax.main` (`sweep.py`) and tabulate them (`results.py`)."""
