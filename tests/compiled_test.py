"""Equivalence tests compiled as training compiles: XLA's optimisations on (conftest turns
them off for the rest of the suite) and `steps.compiler_options`."""

import os
import re
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from alexnet_jax import optimizers
from alexnet_jax import sharding
from alexnet_jax import steps
from alexnet_jax import train
from helpers import logged_train_rows
from helpers import mesh_of
from helpers import optimised_compiles
from helpers import small_config

# One worker runs both, so the loop's run finds the 2 × 2 step the first test compiled
# (the same program: the persistent compilation cache) instead of compiling it again.
pytestmark = [
  pytest.mark.slow,
  pytest.mark.xdist_group('compiled'),
  pytest.mark.usefixtures('fashion_mnist_as_is', 'optimised'),
]

NUM_EXAMPLES = 16  # Mock examples in each split: 2 steps an epoch of batch 8.


@pytest.fixture
def optimised():
  with optimised_compiles():
    yield


def loop_config():
  """The loop's config of both tests: a constant rate, so that step 1 moves the weights
  (the Fashion-MNIST warm-up starts at 0), small enough that the loss falls; dropout on."""
  return small_config(
    learning_rate=0.002,
    lr_schedule='constant',
    num_train_steps=5,
    eval_every_steps=5,
    checkpoint_every_steps=3,
  )


def ynn_fused_ops(hlo_text: str) -> set[str]:
  """The HLO ops inside a compiled program's YNNPACK fusions."""
  called = set(re.findall(r'calls=(%[\w.\-]+)[^\n]*"kind":"__ynn_fusion"', hlo_text))
  bodies = re.findall(r'^(%[\w.\-]+) [^\n]*\{\n(.*?)\n\}', hlo_text, re.S | re.M)
  return {
    op for name, body in bodies if name in called for op in re.findall(r'= \S+ ([\w-]+)\(', body)
  }


def two_steps(mesh, config, batch):
  """The loop's train step (`train.train_and_evaluate` builds the same) run twice from
  the loop's initial state: ((state, [metrics of each step]), compiled HLO text)."""
  tx = optimizers.create_optimizer(
    config,
    optimizers.create_learning_rate_schedule(
      config, NUM_EXAMPLES // config.batch_size, config.num_train_steps
    ),
  )
  params_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
  state = steps.create_train_state(config, tx, params_rng, mesh)
  batch = sharding.global_batch(mesh, batch)
  step = steps.jit_train_step(mesh, steps.graphdefs(config)[0], state, tx)
  compiled = step.lower(state, batch, dropout_rng).compile()
  history = []
  for _ in range(2):
    state, metrics = compiled(state, batch, dropout_rng)
    history.append(metrics)
  return jax.device_get((state, history)), compiled.as_text()


def assert_close_per_leaf(got, want, rtol):
  """Every leaf within `rtol` of its own largest magnitude (float rounding only)."""
  for (path, a), b in zip(
    jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want), strict=True
  ):
    scale = np.abs(b).max()
    assert np.abs(a - b).max() <= rtol * scale, (jax.tree_util.keystr(path), scale)


def test_two_by_two_mesh_step_equals_one_device_as_compiled_for_training():
  """Two steps on the 2 × 2 mesh give the one-device run's losses, gradients (the
  momentum) and weights, dropout included, to float rounding (the towers' and the
  batch halves' sums run in other orders: measured 8e-7 of each leaf's largest value,
  2e-7 of the loss)."""
  assert not jax.config.read('jax_disable_most_optimizations')
  config = loop_config()
  rng = np.random.RandomState(0)
  batch = {
    'image': rng.randn(8, 67, 67, 3).astype(np.float32),
    'label': rng.randint(0, 10, 8).astype(np.int32),
  }
  (ref_state, ref_history), ref_hlo = two_steps(mesh_of(1, 1), config, batch)
  (state, history), hlo = two_steps(mesh_of(2, 2), config, batch)
  # steps.compiler_options took effect: convolutions are XLA's, reductions YNNPACK's.
  for text in (ref_hlo, hlo):
    fused = ynn_fused_ops(text)
    assert 'reduce' in fused and 'convolution' not in fused, fused
  for metrics, ref_metrics in zip(history, ref_history, strict=True):
    assert float(metrics['loss']) == pytest.approx(float(ref_metrics['loss']), rel=1e-6)
    assert float(metrics['finite']) == 1.0
  assert float(history[1]['loss']) < float(history[0]['loss'])  # Step 1 trained.
  momentum = lambda s: s.opt_state[-1].velocity
  assert_close_per_leaf(momentum(state), momentum(ref_state), 1e-5)
  assert_close_per_leaf(state.params, ref_state.params, 1e-5)
  assert not np.allclose(momentum(state)['fc6']['kernel'], 0)


def restore_params(workdir, step):
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')) as manager:
    return manager.restore(step)['params']


def test_resume_is_bit_identical_as_compiled_for_training(tmp_path):
  """The loop on the 2 × 2 mesh, stopped after step 3 (mid-epoch 1) and resumed,
  ends with the uninterrupted run's weights, losses and test metrics bit for bit
  (the same compiled programs on the same values)."""
  assert not jax.config.read('jax_disable_most_optimizations')
  config = loop_config()
  full, resumed = str(tmp_path / 'full'), str(tmp_path / 'resumed')
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    results = train.train_and_evaluate(config, full)
    shutil.copytree(
      os.path.join(full, 'checkpoints', '3'), os.path.join(resumed, 'checkpoints', '3')
    )
    resumed_results = train.train_and_evaluate(config, resumed)
  assert results['step'] == resumed_results['step'] == 5
  for key in ('test_top1', 'test_top5', 'test_loss', 'n_test_examples'):
    assert results[key] == resumed_results[key], key
  jax.tree.map(np.testing.assert_array_equal, restore_params(full, 5), restore_params(resumed, 5))
  full_rows, resumed_rows = logged_train_rows(full), logged_train_rows(resumed)
  assert [r['step'] for r in full_rows] == [1, 2, 3, 4, 5]
  assert [r['step'] for r in resumed_rows] == [4, 5]
  assert [r['train_loss'] for r in resumed_rows] == [r['train_loss'] for r in full_rows[3:]]
