"""Shared test setup: 4 simulated CPU devices, fast compiles, the repo root importable."""

import os
import sys
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Before JAX starts: 4 CPU devices for the ('data', 'model') = (2, 2) mesh tests.
# Runs without an explicit mesh (train_and_evaluate) then use that mesh too.
os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=4'
)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# One on-disk compilation cache for the test processes and the commands they start:
# the same small programs are compiled by many tests.
os.environ.setdefault(
  'JAX_COMPILATION_CACHE_DIR', os.path.join(tempfile.gettempdir(), 'alexnet_jax_tests_jax_cache')
)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
# Commands started by the tests compile fast too (read by JAX from the environment).
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')

import jax  # noqa: E402  (after the environment above)

# Tiny shapes and few steps: compile time dominates, and numerics are unaffected.
jax.config.update('jax_disable_most_optimizations', True)


import pytest  # noqa: E402


@pytest.fixture
def fashion_mnist_as_is(monkeypatch):
  """Under `tfds.testing.mock_data`, use the fashion_mnist builder as it is: building it
  from the real files is tested in input_pipeline_test."""
  from helpers import use_fashion_mnist_as_is  # pylint: disable=g-import-not-at-top

  use_fashion_mnist_as_is(monkeypatch)


@pytest.fixture
def one_device(monkeypatch):
  """Meshes created from a config (the loop, evaluation, plots) use the first simulated
  device only: the loop's tests need no mesh; sharding_test covers the meshes."""
  from helpers import on_devices  # pylint: disable=g-import-not-at-top

  on_devices(monkeypatch, 1)


@pytest.fixture(scope='session')
def toy_image_folder(tmp_path_factory):
  """A small image-folder dataset on disk (helpers.write_image_folder), for commands run
  as subprocesses, where TFDS's mock data cannot reach."""
  from helpers import write_image_folder  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp('image_folder')
  write_image_folder(str(root))
  return str(root)


@pytest.fixture(scope='session', autouse=True)
def xdist_groups_kept(request):
  """Fails every test where `--dist loadgroup` would not keep an `xdist_group` on one worker.

  pytest-xdist tags grouped tests' node ids at collection; pytest 9.2 moved node ids where
  xdist 3.8's tag is lost, and each worker then built every module fixture again (the
  SLURM scenarios ran twice). requirements.txt pins a pair that works.
  """
  if not getattr(request.config.option, 'loadgroup', False):
    return
  items = request.session.items
  lost = [i.nodeid for i in items if i.get_closest_marker('xdist_group') and '@' not in i.nodeid]
  if lost:
    pytest.fail(
      f'pytest-xdist did not group {lost[0]} (and {len(lost) - 1} more): this pytest '
      f'({pytest.__version__}) and pytest-xdist pair ignores xdist_group. Install '
      'requirements.txt (.ci/setup.sh).'
    )
