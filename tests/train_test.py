"""Tests of the train step, schedules, checkpoint resume and the whole loop on mock data."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from alexnet_jax import optimizers
from alexnet_jax import sharding
from alexnet_jax import steps
from alexnet_jax import train
from configs import imagenet
from helpers import mesh_of
from helpers import small_config as base_config
from helpers import train_state


pytestmark = pytest.mark.usefixtures('fashion_mnist_as_is')


def small_config(**overrides):
  return base_config(eval_batch_size=12, **overrides)  # 64 test examples: padded.


def test_cpu_compiler_options_leave_convolutions_to_xla():
  """The options move the convs out of YNNPACK (see `steps.compiler_options`)."""
  x, kernel = jnp.ones((2, 27, 27, 48)), jnp.ones((5, 5, 48, 128))

  def conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME',
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  def count_ynnpack_calls(**jit_kwargs):
    hlo = jax.jit(conv, **jit_kwargs).lower(x, kernel).compile().as_text()
    return hlo.count('%ynn_fusion')

  # Optimised as in training (conftest's fast compiles keep YNNPACK convs regardless).
  unoptimised = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', False)
  try:
    assert count_ynnpack_calls() > 0  # jaxlib's default, which the options undo.
    assert count_ynnpack_calls(compiler_options=steps.compiler_options()) == 0
  finally:
    jax.config.update('jax_disable_most_optimizations', unoptimised)


def test_train_steps_lower_the_loss_on_a_fixed_batch():
  config = small_config(learning_rate=0.01, lr_schedule='constant')
  mesh = mesh_of(1, 1)
  state, tx = train_state(config, mesh, learning_rate=config.learning_rate)
  rng = np.random.RandomState(0)
  batch = {'image': rng.randn(16, 67, 67, 3).astype(np.float32),
           'label': rng.randint(0, 10, 16).astype(np.int32)}
  step = steps.jit_train_step(mesh, steps.graphdefs(config)[0], state, tx)
  losses = []
  for _ in range(8):
    state, metrics = step(state, sharding.global_batch(mesh, batch), jax.random.key(1))
    losses.append(float(metrics['loss']))
  assert int(state.step) == 8
  assert losses[-1] < 0.5 * losses[0], losses


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def restore_params(workdir, step):
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')) as manager:
    return manager.restore(step)['params']


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path):
  config = small_config()
  full, resumed = str(tmp_path / 'full'), str(tmp_path / 'resumed')
  with tfds.testing.mock_data(num_examples=64):
    results = train.train_and_evaluate(config, full)
    # A run killed after step 3: only that checkpoint exists.
    shutil.copytree(os.path.join(full, 'checkpoints', '3'),
                    os.path.join(resumed, 'checkpoints', '3'))
    resumed_results = train.train_and_evaluate(config, resumed)

  assert results['step'] == resumed_results['step'] == 6
  assert results['n_test_examples'] == 64
  for key in ('test_top1', 'test_top5', 'test_loss'):
    assert results[key] == pytest.approx(resumed_results[key], rel=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               restore_params(full, 6), restore_params(resumed, 6))
  after_3 = lambda rows: [r for r in rows if r['step'] > 3 and 'train_loss' in r]
  full_rows, resumed_rows = after_3(read_metrics(full)), after_3(read_metrics(resumed))
  assert [r['step'] for r in full_rows] == [4, 5, 6]
  for a, b in zip(full_rows, resumed_rows):
    assert a['train_loss'] == pytest.approx(b['train_loss'], rel=1e-6)


def test_results_json_is_written_with_fractions(tmp_path):
  with tfds.testing.mock_data(num_examples=64):
    train.train_and_evaluate(small_config(num_train_steps=2), str(tmp_path))
  with open(tmp_path / 'results.json') as f:
    results = json.load(f)
  assert set(results) == {'step', 'epoch', 'test_top1', 'test_top5', 'test_loss',
                          'n_test_examples', 'train_images_per_sec', 'wall_seconds'}
  assert 0 <= results['test_top1'] <= results['test_top5'] <= 1
  assert results['step'] == 2 and results['n_test_examples'] == 64


def test_nan_loss_stops_with_a_clear_error(tmp_path):
  with tfds.testing.mock_data(num_examples=64):
    with pytest.raises(FloatingPointError, match='learning_rate'):
      train.train_and_evaluate(
          small_config(learning_rate=1e30, lr_schedule='constant'), str(tmp_path))


def test_imagenet_config_trains_on_mock_data(tmp_path):
  config = imagenet.get_config()
  config.batch_size = 2
  config.eval_batch_size = 2
  config.shuffle_buffer = 4
  config.num_train_steps = 2
  config.log_every_steps = 1
  with tfds.testing.mock_data(num_examples=3):
    results = train.train_and_evaluate(config, str(tmp_path))
  assert results['step'] == 2 and results['n_test_examples'] == 3
  assert np.isfinite(results['test_loss'])
