"""Tests of torchvision's one-column AlexNet (`models.AlexNetOWT`, config.model
'alexnet_owt'): shapes and the adaptive pool against PyTorch's, and its steps on the
mesh against one device."""

from flax import nnx
import jax
import numpy as np
import pytest
import torch

from alexnet_jax import models
from alexnet_jax import plots
from alexnet_jax import sharding
from alexnet_jax import steps
from configs import fashion_mnist
import helpers
from helpers import mesh_of
from helpers import train_state

torchvision = helpers.import_torchvision()


def test_parameter_count_and_shapes_are_torchvisions():
  """61,100,840 parameters at 1000 classes: torchvision's AlexNet_Weights `num_params`;
  each layer's shape is its torchvision tensor's, transposed."""
  model = nnx.eval_shape(lambda: models.AlexNetOWT(1000, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert sum(x.size for x in jax.tree.leaves(params)) == 61_100_840
  with torch.device('meta'):  # Shapes only, nothing drawn.
    reference = torchvision.models.alexnet().state_dict()
  torch_shapes = [tuple(t.shape) for t in reference.values()]
  # HWIO → PyTorch's (out, in, kh, kw); (in, out) → (out, in).
  torch_layout = lambda k: (k[3], k[2], k[0], k[1]) if len(k) == 4 else (k[1], k[0])
  ours = [
    shape
    for name in models.LAYERS
    for shape in (torch_layout(params[name]['kernel'].shape), params[name]['bias'].shape)
  ]
  assert ours == torch_shapes


@pytest.mark.parametrize('in_size, out_size', [(6, 6), (13, 6), (4, 6), (7, 3), (2, 6), (9, 4)])
def test_adaptive_avg_pool_is_pytorchs(in_size, out_size):
  """PyTorch's bins (overlapping when out does not divide in, repeated when in < out)."""
  x = np.random.RandomState(0).randn(2, in_size, in_size + 1, 3).astype(np.float32)
  ours = np.asarray(models.adaptive_avg_pool(x, out_size))
  torch_pool = torch.nn.functional.adaptive_avg_pool2d(
    torch.from_numpy(x).permute(0, 3, 1, 2), out_size
  )
  np.testing.assert_allclose(ours, torch_pool.permute(0, 2, 3, 1).numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('image_size, expected', [(224, 6), (227, 6), (160, 4), (63, 1), (99, 2)])
def test_last_pooled_maps_are_torchvisions(image_size, expected):
  """The side of torchvision's `features` output (before its adaptive pool)."""
  assert models.owt_pool5_size(image_size) == expected
  with torch.device('meta'):
    out = torchvision.models.alexnet().features(torch.empty(1, 3, image_size, image_size))
  assert tuple(out.shape[2:]) == (expected, expected)


def test_too_small_image_raises():
  with pytest.raises(ValueError, match='at least 63'):
    models.AlexNetOWT(10, image_size=62, rngs=nnx.Rngs(0))


def owt_config():
  config = fashion_mnist.get_config()
  config.model = 'alexnet_owt'
  return config


def test_create_model_builds_the_named_network():
  config = owt_config()
  model = nnx.eval_shape(lambda: steps.create_model(config, nnx.Rngs(0)))
  assert isinstance(model, models.AlexNetOWT) and model.fc8.kernel.shape == (4096, 10)
  config.model = 'alexnet_bn'
  model = nnx.eval_shape(lambda: steps.create_model(config, nnx.Rngs(0)))
  assert isinstance(model, models.AlexNetBN) and model.conv1.kernel.shape == (11, 11, 3, 96)
  config.model = 'vgg16'
  with pytest.raises(ValueError, match="config.model='vgg16': use one of alexnet, alexnet_bn"):
    steps.create_model(config, nnx.Rngs(0))


def test_one_column_conv1_mosaic():
  """64 kernels as one 8 × 8 block, no tower gap."""
  kernel = np.random.RandomState(0).randn(11, 11, 3, 64).astype(np.float32)
  mosaic = plots.conv1_mosaic(kernel, towers=1)
  assert mosaic.shape == (8 * 12 + 1, 8 * 12 + 1, 3)
  last = (kernel[..., 63] - kernel[..., 63].min()) / np.ptp(kernel[..., 63])
  np.testing.assert_allclose(mosaic[85:96, 85:96], last, atol=1e-6)
  [ax] = plots.conv1_filters(kernel, towers=1).axes
  assert not ax.get_yticklabels()


def fixed_batch(n=8):
  rng = np.random.RandomState(0)
  return {
    'image': rng.randint(0, 256, (n, 67, 67, 3), np.uint8),
    'flip': rng.rand(n) < 0.5,
    'label': rng.randint(0, 10, n).astype(np.int32),
    'mask': np.ones(n, np.float32),
  }


def one_step(data, model):
  """A train step (dropout on) of the 67-px one-column network."""
  config = owt_config()
  mesh = mesh_of(data, model)
  state, tx = train_state(config, mesh)
  normalization = (config.pixel_mean, config.pixel_std)
  train_fn = steps.jit_train_step(mesh, steps.graphdefs(config)[0], state, tx, normalization)
  state, metrics = train_fn(state, sharding.global_batch(mesh, fixed_batch()), jax.random.key(1))
  return jax.device_get((state, metrics))


@pytest.mark.slow
def test_step_on_the_2x2_mesh_equals_one_device():
  """Data parallelism and the 'model' axis (each device computes half of every layer's
  maps, then gathers them): the same loss, gradients (the first momentum) and
  parameters as one device, dropout included; every kernel is split over 'model'."""
  state, metrics = one_step(2, 2)
  ref_state, ref_metrics = one_step(1, 1)
  assert float(metrics['loss']) == pytest.approx(float(ref_metrics['loss']), rel=1e-5)
  momentum = lambda s: s.opt_state[-1].velocity  # -lr (grads + decay) after step 1.
  for got, want in ((state.params, ref_state.params), (momentum(state), momentum(ref_state))):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), got, want)
  assert not np.allclose(momentum(state)['fc6']['kernel'], 0)
  specs = sharding.partition_specs(state.params)
  assert all(specs[f'conv{i}']['kernel'][-1] == sharding.MODEL_AXIS for i in range(1, 6))
