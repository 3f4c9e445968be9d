"""Tests of the AlexNet module and LRN against independent references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from flax import nnx

from alexnet_jax import models


def lrn_numpy_loop(a, size=5, k=2.0, alpha=1e-4, beta=0.75):
  """The paper's Sec. 3.3 formula written out channel by channel."""
  n_channels = a.shape[-1]
  b = np.empty_like(a)
  for i in range(n_channels):
    lo, hi = max(0, i - size // 2), min(n_channels - 1, i + size // 2)
    b[..., i] = a[..., i] / (k + alpha * np.sum(a[..., lo : hi + 1] ** 2, axis=-1)) ** beta
  return b


@pytest.mark.parametrize('scale', [1.0, 30.0])
def test_lrn_matches_numpy_and_tensorflow(scale):
  x = np.random.RandomState(0).randn(2, 5, 5, 48).astype(np.float32) * scale
  ours = np.asarray(models.local_response_norm(jnp.asarray(x)))
  tf_lrn = tf.nn.local_response_normalization(
    x, depth_radius=2, bias=2.0, alpha=1e-4, beta=0.75
  ).numpy()
  np.testing.assert_allclose(ours, lrn_numpy_loop(x), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ours, tf_lrn, rtol=1e-5, atol=1e-6)
  if scale > 1:  # Large activations: the squared sum visibly matters.
    assert not np.allclose(ours, x / 2.0**0.75, rtol=1e-3)


def lrn_formula(x, size=5, k=2.0, alpha=1e-4, beta=0.75):
  """The formula with a general power, differentiated by JAX's autodiff."""
  padded = jnp.pad(jnp.square(x), [(0, 0)] * (x.ndim - 1) + [(size // 2, size // 2)])
  window = sum(padded[..., i : i + x.shape[-1]] for i in range(size))
  return x / jnp.power(k + alpha * window, beta)


@pytest.mark.parametrize('beta', [0.75, 0.6])
def test_lrn_gradient_matches_autodiff_and_tensorflow(beta):
  rng = np.random.RandomState(1)
  x = np.maximum(rng.randn(2, 4, 4, 48), 0).astype(np.float32) * 40  # After a ReLU.
  g = rng.randn(*x.shape).astype(np.float32)
  ours = jax.vjp(lambda a: models.local_response_norm(a, beta=beta), jnp.asarray(x))[1](g)[0]
  autodiff = jax.vjp(lambda a: lrn_formula(a, beta=beta), jnp.asarray(x))[1](g)[0]
  x_tf = tf.constant(x)
  with tf.GradientTape() as tape:
    tape.watch(x_tf)
    y = tf.nn.local_response_normalization(x_tf, depth_radius=2, bias=2.0, alpha=1e-4, beta=beta)
  tf_grad = tape.gradient(y, x_tf, output_gradients=tf.constant(g)).numpy()
  np.testing.assert_allclose(ours, autodiff, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ours, tf_grad, rtol=1e-4, atol=1e-5)
  # The cross-channel term matters at this scale: not just g * s^-beta.
  assert not np.allclose(ours, g / 2.0**beta, rtol=1e-2)


def test_max_pool_gradient_matches_select_and_scatter():
  """Same values and gradients as XLA's reduce-window max, ReLU ties at 0 included."""
  rng = np.random.RandomState(2)
  x = jnp.asarray(np.maximum(rng.randn(2, 13, 13, 8), 0), jnp.float32)
  y, vjp = jax.vjp(models.max_pool, x)
  ref_y, ref_vjp = jax.vjp(lambda a: nnx.max_pool(a, (3, 3), strides=(2, 2)), x)
  g = jnp.asarray(rng.randn(*y.shape), jnp.float32)
  assert y.shape == (2, 6, 6, 8)
  np.testing.assert_array_equal(y, ref_y)
  np.testing.assert_allclose(vjp(g)[0], ref_vjp(g)[0], rtol=1e-6, atol=1e-6)
  # A window of equal values sends its whole gradient to its first element.
  grad = jax.grad(lambda a: models.max_pool(a).sum())(jnp.zeros((1, 3, 3, 1)))
  np.testing.assert_array_equal(grad[0, :, :, 0], [[1, 0, 0], [0, 0, 0], [0, 0, 0]])


def test_lrn_rejects_even_size():
  with pytest.raises(ValueError, match='odd'):
    models.local_response_norm(jnp.ones((1, 4)), size=4)


def abstract_params(**kwargs):
  model = nnx.eval_shape(lambda: models.AlexNet(rngs=nnx.Rngs(0), **kwargs))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_parameter_count_and_caffe_shapes():
  params = abstract_params()
  assert sum(x.size for x in jax.tree.leaves(params)) == 60_965_224
  kernels = {name: layer['kernel'].shape for name, layer in params.items()}
  assert kernels == {
    'conv1': (11, 11, 3, 96),
    'conv2': (5, 5, 48, 256),
    'conv3': (3, 3, 256, 384),
    'conv4': (3, 3, 192, 384),
    'conv5': (3, 3, 192, 256),
    'fc6': (9216, 4096),
    'fc7': (4096, 4096),
    'fc8': (4096, 1000),
  }
  assert all(params[n]['bias'].shape == (s[-1],) for n, s in kernels.items())


def test_activation_shapes_at_227():
  model = models.AlexNet(10, image_size=227, rngs=nnx.Rngs(0))
  model.eval()
  images = jnp.zeros((1, 227, 227, 3))
  conv1 = jax.eval_shape(model.conv1, images)
  assert [t.shape for t in conv1] == [(1, 55, 55, 48)] * 2
  assert jax.eval_shape(model.features, images).shape == (1, 6, 6, 256)
  assert jax.eval_shape(model, images).shape == (1, 10)


@pytest.mark.parametrize('image_size, expected', [(227, 6), (224, 5), (67, 1), (99, 2)])
def test_pool5_size(image_size, expected):
  assert models.pool5_size(image_size) == expected


def test_too_small_image_raises():
  with pytest.raises(ValueError, match='at least 67'):
    models.AlexNet(10, image_size=63, rngs=nnx.Rngs(0))


def test_paper_init_statistics():
  params = nnx.to_pure_dict(
    nnx.state(models.AlexNet(10, image_size=67, rngs=nnx.Rngs(0)), nnx.Param)
  )
  for name in ('conv1', 'conv2', 'conv3', 'conv4', 'conv5', 'fc6', 'fc7', 'fc8'):
    assert abs(float(jnp.std(params[name]['kernel'])) - 0.01) < 1e-3, name
    bias = 1.0 if name in ('conv2', 'conv4', 'conv5', 'fc6', 'fc7') else 0.0
    np.testing.assert_array_equal(params[name]['bias'], bias)


def test_tower_local_conv_ignores_the_other_tower():
  model = models.AlexNet(10, image_size=67, rngs=nnx.Rngs(0))
  rng = np.random.RandomState(1)
  tower0, tower1 = (jnp.asarray(rng.randn(2, 7, 7, 48), jnp.float32) for _ in range(2))
  out0, out1 = model.conv2([tower0, tower1])
  new0, new1 = model.conv2([tower0, tower1 + 1.0])
  np.testing.assert_array_equal(out0, new0)
  assert not np.allclose(out1, new1)


@pytest.mark.slow
def test_cross_tower_conv_reads_both_towers():
  model = models.AlexNet(10, image_size=67, rngs=nnx.Rngs(0))
  rng = np.random.RandomState(2)
  tower0, tower1 = (jnp.asarray(rng.randn(2, 3, 3, 128), jnp.float32) for _ in range(2))
  out0, _ = model.conv3(jnp.concatenate([tower0, tower1], -1))
  new0, _ = model.conv3(jnp.concatenate([tower0, tower1 + 1.0], -1))
  assert not np.allclose(out0, new0)


def test_towers_equal_caffe_grouped_convolution():
  """Per-tower convs == one conv with feature_group_count=2 on the Caffe kernel."""
  model = models.AlexNet(10, image_size=67, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.RandomState(3).randn(2, 7, 7, 96), jnp.float32)
  towers = model.conv2(jnp.split(x, 2, axis=-1))
  grouped = (
    jax.lax.conv_general_dilated(
      x,
      model.conv2.kernel[...],
      (1, 1),
      [(2, 2), (2, 2)],
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=2,
    )
    + model.conv2.bias[...]
  )
  np.testing.assert_allclose(jnp.concatenate(towers, -1), grouped, rtol=1e-5, atol=1e-5)


def test_dropout_keeps_1_minus_p_and_scales_by_1_over_1_minus_p():
  dropout = models.Dropout(0.5)
  x = jnp.full((200, 500), 3.0)
  out = np.asarray(dropout(x, rngs=nnx.Rngs(dropout=0)))
  kept = out != 0
  assert set(np.unique(out)) == {0.0, 6.0}  # 3 / (1 - 0.5).
  assert abs(kept.mean() - 0.5) < 4 * np.sqrt(0.25 / kept.size)  # 4 sigma.
  other = np.asarray(dropout(x, rngs=nnx.Rngs(dropout=1))) != 0
  assert (kept != other).mean() > 0.4  # Another key, another mask.
  dropout = models.Dropout(0.2)
  out = np.asarray(dropout(x, rngs=nnx.Rngs(dropout=0)))
  assert set(np.unique(out)) == {0.0, 3.75}  # 3 / 0.8.
  assert abs((out != 0).mean() - 0.8) < 4 * np.sqrt(0.16 / out.size)


def test_dropout_acts_on_the_fc6_and_fc7_outputs_only_and_in_train_mode(monkeypatch):
  model = models.AlexNet(10, image_size=67, init='he', rngs=nnx.Rngs(0))
  images = jnp.asarray(np.random.RandomState(4).randn(2, 67, 67, 3), jnp.float32)
  seen = []
  drop = models.Dropout.__call__

  def recording(self, x, **kwargs):
    out = drop(self, x, **kwargs)
    seen.append((x.shape, bool(np.any(np.asarray(out) != np.asarray(x)))))
    return out

  monkeypatch.setattr(models.Dropout, '__call__', recording)
  model.train()
  model(images, rngs=nnx.Rngs(dropout=0))
  assert seen == [((2, 4096), True), ((2, 4096), True)]  # fc6, fc7 outputs: dropped.
  seen.clear()
  model.eval()
  logits = model(images)
  assert [changed for _, changed in seen] == [False, False]
  np.testing.assert_array_equal(logits, model(images))


def test_bfloat16_compute_gives_float32_logits():
  model = models.AlexNet(10, image_size=67, init='he', dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  model.eval()
  logits = model(jnp.ones((1, 67, 67, 3)))
  assert logits.dtype == jnp.float32
  assert model.conv1.kernel[...].dtype == jnp.float32


def test_paper_text_lrn_is_sec_3_3_over_all_maps_of_the_layer():
  """b_i = a_i / (k + α Σ_{j=max(0,i-n/2)}^{min(N-1,i+n/2)} a_j²)^β with the printed
  k = 2, n = 5, α = 1e-4, β = 0.75 and N = 96 (both towers), on ReLU'd conv1 maps."""
  rng = np.random.RandomState(0)
  towers = [(rng.randn(2, 3, 3, 48) * 40).astype(np.float32) for _ in range(2)]
  got = np.concatenate(models._relu_lrn(towers, models.LRN_CONVENTIONS['paper-text'], None), -1)
  a = np.maximum(np.concatenate(towers, -1).astype(np.float64), 0)
  squares = np.square(a)
  window = np.stack([squares[..., max(0, i - 2) : i + 3].sum(-1) for i in range(96)], -1)
  np.testing.assert_allclose(got, a / (2 + 1e-4 * window) ** 0.75, rtol=1e-5, atol=1e-6)
