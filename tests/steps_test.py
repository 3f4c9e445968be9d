"""Tests of the jitted steps: the train step, NaN detection, the compiler options."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from alexnet_jax import sharding
from alexnet_jax import steps
from helpers import REPO
from helpers import mesh_of
from helpers import optimised_compiles
from helpers import small_config
from helpers import train_state


def test_cpu_compiler_options_leave_convolutions_to_xla_and_reductions_to_ynnpack():
  """The options move the convs out of YNNPACK and the reductions into it (see
  `steps.compiler_options`): XLA's own would be reduce-windows."""
  x, kernel = jnp.ones((2, 27, 27, 48)), jnp.ones((5, 5, 48, 128))

  def conv(x, kernel):
    return jax.lax.conv_general_dilated(
      x, kernel, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )

  def bias_gradient(x, kernel):  # A ReLU's gradient summed over N, H, W.
    return jnp.sum(jnp.where(x > 0, x * 2.0, 0.0), (0, 1, 2)) + kernel.sum()

  def compiled(fn, **jit_kwargs):
    return jax.jit(fn, **jit_kwargs).lower(x, kernel).compile().as_text()

  # Optimised as in training (conftest's fast compiles keep YNNPACK convs regardless).
  with optimised_compiles():
    options = {'compiler_options': steps.compiler_options()}
    assert '%ynn_fusion' in compiled(conv)  # jaxlib's default, which the options undo.
    assert '%ynn_fusion' not in compiled(conv, **options)
    assert 'reduce-window(' not in compiled(bias_gradient, **options)
    assert '%ynn_fusion' in compiled(bias_gradient, **options)


@pytest.mark.slow
def test_train_steps_lower_the_loss_on_a_fixed_batch():
  config = small_config(learning_rate=0.001, lr_schedule='constant', dropout_rate=0.0)
  mesh = mesh_of(1, 1)
  state, tx = train_state(config, mesh, learning_rate=config.learning_rate)
  rng = np.random.RandomState(0)
  batch = {
    'image': rng.randn(16, 67, 67, 3).astype(np.float32),
    'label': rng.randint(0, 10, 16).astype(np.int32),
  }
  step = steps.jit_train_step(mesh, steps.graphdefs(config)[0], state, tx)
  losses = []
  for _ in range(12):
    state, metrics = step(state, sharding.global_batch(mesh, batch), jax.random.key(1))
    losses.append(float(metrics['loss']))
    assert float(metrics['finite']) == 1.0
  assert int(state.step) == 12
  assert losses[-1] < 0.5 * losses[0], losses


def test_one_nan_pixel_makes_the_step_not_finite():
  config = small_config()
  mesh = mesh_of(1, 1)
  state, tx = train_state(config, mesh)
  step = steps.jit_train_step(mesh, steps.graphdefs(config)[0], state, tx)
  images = np.zeros((8, 67, 67, 3), np.float32)
  images[3, 10, 20, 1] = np.nan
  batch = {'image': images, 'label': np.zeros(8, np.int32)}
  _, metrics = step(state, sharding.global_batch(mesh, batch), jax.random.key(1))
  assert float(metrics['finite']) == 0.0


def test_all_finite_sees_one_nan_or_inf_anywhere():
  tree = {'a': jnp.ones((3, 4)), 'b': [jnp.zeros(5), jnp.arange(3.0)]}
  assert bool(steps.all_finite(tree))
  for bad in (np.nan, np.inf, -np.inf):
    broken = jax.tree.map(lambda x: x, tree)
    broken['b'][1] = broken['b'][1].at[2].set(bad)
    assert not bool(steps.all_finite(broken))


def test_correct_topk_counts_the_label_among_the_k_highest():
  logits = jnp.array([[0.1, 0.5, 0.2, 0.9, 0.0, 0.3], [3.0, 2.0, 1.0, 0.0, -1.0, -2.0]])
  np.testing.assert_array_equal(steps.correct_topk(logits, jnp.array([1, 0]), 1), [0, 1])
  np.testing.assert_array_equal(steps.correct_topk(logits, jnp.array([1, 5]), 5), [1, 0])
  np.testing.assert_array_equal(  # k above the class count: every label counts.
    steps.correct_topk(logits[:, :3], jnp.array([2, 2]), 5), [1, 1]
  )


@pytest.mark.parametrize('benchmark', ['train_throughput', 'conv_layers'])
@pytest.mark.slow
def test_steps_and_benchmarks_import_without_tensorflow(benchmark):
  """The GPU machines have JAX but no TensorFlow: the model, the steps, checkpoints and
  the train-step and convolution benchmarks (each defines its own absl flags, so one
  per process) must not import it."""
  code = (
    "import sys; sys.modules['tensorflow'] = sys.modules['tensorflow_datasets'] = None\n"
    'import alexnet_jax.steps, alexnet_jax.checkpoints, alexnet_jax.optimizers\n'
    f'import alexnet_jax.config_lib, benchmarks.{benchmark}'
  )
  result = subprocess.run(
    [sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
  )
  assert result.returncode == 0, result.stderr[-2000:]


def random_batch(n, size=67, seed=0):
  rng = np.random.RandomState(seed)
  return {
    'image': rng.randn(n, size, size, 3).astype(np.float32),
    'label': rng.randint(0, 10, n).astype(np.int32),
  }


def whole_batch_step(config, state, tx, batch, dropout_rng):
  """The reference: one update from the mean loss over the whole batch in one go
  (the step as it was before accumulation), on one device."""
  model = steps.graphdefs(config)[0]
  dropout_key = jax.random.fold_in(dropout_rng, state.step)

  def loss_fn(params):
    logits = nnx.merge(model, params)(batch['image'], rngs=nnx.Rngs(dropout=dropout_key))
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
    return loss, logits

  (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(state.params)
  updates, _ = tx.update(grads, state.opt_state, state.params)
  ranks = np.argsort(-np.asarray(logits), axis=-1)
  labels = np.asarray(batch['label'])[:, None]
  metrics = {'loss': loss, 'top1': np.mean(ranks[:, :1] == labels) * 1.0}
  metrics['top5'] = np.mean(np.any(ranks[:, :5] == labels, axis=-1))
  return updates, metrics


def assert_close_updates(got, want):
  """Equal up to float32 summation order: relative to each leaf's largest entry."""
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    b = np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


@pytest.mark.slow
@pytest.mark.parametrize('unrolled', [True, False], ids=['unrolled', 'scan'])
def test_accumulated_micro_batches_make_the_whole_batch_update(unrolled, monkeypatch):
  """4 micro-batches' mean gradient is the whole batch's (dropout off, paper model,
  paper SGD): the same first update (the momentum, -lr (g + wd w)); the metrics are
  the whole batch's, not the last micro-batch's. sharding_test does 2 on a 2×2 mesh.
  Both ways of running them: unrolled (as on CPU) and the `lax.scan` of accelerators."""
  monkeypatch.setattr(steps, '_unrolls_micro_batches', lambda: unrolled)
  config = small_config(dropout_rate=0.0)
  mesh = mesh_of(1, 1)
  state, tx = train_state(config, mesh)
  batch = random_batch(8)
  want_update, want = whole_batch_step(config, state, tx, batch, jax.random.key(1))
  step = steps.jit_train_step(mesh, steps.graphdefs(config)[0], state, tx, grad_accum_steps=4)
  state, got = step(state, sharding.global_batch(mesh, batch), jax.random.key(1))
  assert int(state.step) == 1  # One update, however many micro-batches.
  for key in ('loss', 'top1', 'top5'):
    assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-5), key
  assert_close_updates(state.opt_state[-1].velocity, want_update)


def test_one_micro_batch_draws_the_whole_batch_dropout():
  """grad_accum_steps=1 (the default) is the whole-batch step with its dropout keys
  (fold_in(rng, step)): the same update with dropout on."""
  config = small_config()
  assert config.grad_accum_steps == 1 and config.dropout_rate > 0
  mesh = mesh_of(1, 1)
  state, tx = train_state(config, mesh)
  batch = random_batch(8, seed=1)
  want_update, want = whole_batch_step(config, state, tx, batch, jax.random.key(3))
  step = steps.jit_train_step(mesh, steps.graphdefs(config)[0], state, tx)
  state, got = step(state, sharding.global_batch(mesh, batch), jax.random.key(3))
  assert float(got['loss']) == pytest.approx(float(want['loss']), rel=1e-6)
  assert_close_updates(state.opt_state[-1].velocity, want_update)


def test_micro_batches_interleave_rows_so_each_device_keeps_its_own():
  """8 rows on 2 devices (rows 0-3, 4-7), k = 2: micro-batch 0 is rows 0, 2 | 4, 6."""
  rows = np.arange(8)
  split = np.asarray(steps.micro_batches({'x': rows}, 2)['x'])
  np.testing.assert_array_equal(split, [[0, 2, 4, 6], [1, 3, 5, 7]])
  with pytest.raises(ValueError, match='8 rows does not split into 3'):
    steps.micro_batches({'x': rows}, 3)
