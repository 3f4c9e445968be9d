"""Shared test setup: quiet TensorFlow, fast compiles, the repo root importable."""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top

# Tiny shapes and few steps: compile time dominates, and numerics are unaffected.
jax.config.update('jax_disable_most_optimizations', True)
