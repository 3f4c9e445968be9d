"""Shared test setup: 4 simulated CPU devices, fast compiles, the repo root importable."""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Before JAX starts: 4 CPU devices for the ('data', 'model') = (2, 2) mesh tests.
# Runs without an explicit mesh (train_and_evaluate) then use that mesh too.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                           + ' --xla_force_host_platform_device_count=4')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top

# Tiny shapes and few steps: compile time dominates, and numerics are unaffected.
jax.config.update('jax_disable_most_optimizations', True)


import pytest  # pylint: disable=g-import-not-at-top,g-bad-import-order


@pytest.fixture
def fashion_mnist_as_is(monkeypatch):
  """Under `tfds.testing.mock_data`, use the fashion_mnist builder as it is: building it
  from the real files is tested in input_pipeline_test."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from alexnet_jax import datasets  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(datasets, 'prepare_fashion_mnist',
                      lambda data_dir, manual_dir: tfds.builder('fashion_mnist', data_dir=data_dir))
