"""Tests of the jitted steps: the train step, NaN detection, the compiler options."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
