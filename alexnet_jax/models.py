"""AlexNet (Krizhevsky, Sutskever & Hinton, NeurIPS 2012) as a Flax NNX module.

The two GPU "towers" of the paper (Sec. 3.2, Fig. 2) are kept explicit: every layer's
output channels are split in two halves, computed as separate per-tower convolutions.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# Sec. 3.2: the network is spread over two GPUs, each holding half of every layer.
NUM_TOWERS = 2

# Sec. 3.3: LRN hyper-parameters "determined using a validation set".
LRN_SIZE = 5  # n, adjacent kernel maps summed over.
LRN_K = 2.0
LRN_ALPHA = 1e-4
LRN_BETA = 0.75

# Sec. 5: weights ~ N(0, 0.01); biases 1 in conv2, conv4, conv5 and the hidden fc layers.
PAPER_INIT_STDDEV = 0.01
PAPER_BIAS_ONE_LAYERS = ('conv2', 'conv4', 'conv5', 'fc6', 'fc7')

_DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')


def local_response_norm(
    x: jax.Array,
    *,
    size: int = LRN_SIZE,
    k: float = LRN_K,
    alpha: float = LRN_ALPHA,
    beta: float = LRN_BETA,
) -> jax.Array:
  """Local response normalization across channels (paper Sec. 3.3).

  b[..., i] = a[..., i] / (k + alpha * sum_{j=i-size//2}^{i+size//2} a[..., j]^2)^beta,
  the sum clipped to the channels that exist. As in the paper, alpha is *not*
  divided by `size`. Equivalent conventions elsewhere:

  * TensorFlow: `tf.nn.local_response_normalization(x, depth_radius=size // 2,
    bias=k, alpha=alpha, beta=beta)` (same formula).
  * PyTorch `nn.LocalResponseNorm(size, alpha', beta, k)` and Caffe's LRN layer
    divide their alpha by `size`: pass `alpha' = alpha * size` (5e-4 here).

  Args:
    x: activations `[..., C]`, any float dtype; channels on the last axis.
    size: odd window width n over channels (paper: 5).
    k: additive constant (paper: 2).
    alpha: scale of the squared sum (paper: 1e-4).
    beta: exponent (paper: 0.75).

  Returns:
    Array of the same shape and dtype as `x`.

  Raises:
    ValueError: if `size` is not a positive odd integer.
  """
  if size < 1 or size % 2 == 0:
    raise ValueError(f'LRN size must be a positive odd integer, got {size}.')
  channels = jnp.arange(x.shape[-1])
  # The clipped window sum as a product with a 0/1 band matrix: a plain GEMM for XLA.
  band = (jnp.abs(channels[:, None] - channels[None, :]) <= size // 2).astype(x.dtype)
  square_sum = jnp.einsum('...c,cd->...d', jnp.square(x), band)
  return x / jnp.power(k + alpha * square_sum, beta)


def _initializers(init: str, name: str):
  """Returns (kernel_init, bias_init) for layer `name` under the named scheme."""
  if init == 'paper':
    bias_value = 1.0 if name in PAPER_BIAS_ONE_LAYERS else 0.0
    return (nnx.initializers.normal(PAPER_INIT_STDDEV),
            nnx.initializers.constant(bias_value))
  if init == 'he':
    # He et al. 2015 (fan-in read from the kernel: what one tower sees); see configs.
    return (nnx.initializers.variance_scaling(2.0, 'fan_in', 'normal'),
            nnx.initializers.zeros_init())
  raise ValueError(f"Unknown init {init!r}: use 'paper' (Sec. 5) or 'he'.")


class TowerConv(nnx.Module):
  """A convolution whose output maps are split over the two towers (Sec. 3.2).

  The kernel is stored as Caffe's grouped `bvlc_alexnet` layout, HWIO with
  I = the input channels one tower sees; output channels `[:out // 2]` belong to
  tower 0. A `tower_local` layer connects each tower only to its own input maps
  (conv2, conv4, conv5); otherwise each tower reads all input maps (conv1, conv3).

  Call it on a sequence of per-tower NHWC inputs; it returns one output per tower.
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int, *,
               name: str, strides: int = 1, padding: int = 0,
               tower_local: bool = False, init: str = 'paper',
               dtype=jnp.float32, rngs: nnx.Rngs):
    groups = NUM_TOWERS if tower_local else 1
    kernel_shape = (kernel_size, kernel_size, in_features // groups, out_features)
    kernel_init, bias_init = _initializers(init, name)
    self.kernel = nnx.Param(kernel_init(rngs.params(), kernel_shape, jnp.float32))
    self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), jnp.float32))
    self.strides = strides
    self.padding = padding
    self.tower_local = tower_local
    self.dtype = dtype

  def __call__(self, towers: Sequence[jax.Array]) -> list[jax.Array]:
    kernels = jnp.split(self.kernel[...].astype(self.dtype), NUM_TOWERS, axis=-1)
    biases = jnp.split(self.bias[...].astype(self.dtype), NUM_TOWERS)
    if self.tower_local:
      inputs = towers
    else:
      inputs = [jnp.concatenate(towers, axis=-1)] * NUM_TOWERS
    return [
        jax.lax.conv_general_dilated(
            x.astype(self.dtype), w, (self.strides, self.strides),
            [(self.padding, self.padding)] * 2,
            dimension_numbers=_DIMENSION_NUMBERS) + b
        for x, w, b in zip(inputs, kernels, biases)
    ]


def _max_pool(towers: Sequence[jax.Array]) -> list[jax.Array]:
  # Sec. 3.4: overlapping pooling, z = 3, s = 2.
  return [nnx.max_pool(x, (3, 3), strides=(2, 2)) for x in towers]


def _lrn_relu(towers: Sequence[jax.Array]) -> list[jax.Array]:
  # Sec. 3.3: LRN after the ReLU, normalising within each tower's own maps.
  return [local_response_norm(jax.nn.relu(x)) for x in towers]


def pool5_size(image_size: int) -> int:
  """Side of the pool5 maps for a square input of `image_size` pixels (6 at 227).

  Raises:
    ValueError: if the image is too small for a 1×1 pool5 (< 67 pixels).
  """
  size = (image_size - 11) // 4 + 1  # conv1, stride 4, no padding.
  for _ in range(3):  # pool1, pool2, pool5; conv2..conv5 keep the size.
    size = (size - 3) // 2 + 1
  if size < 1:
    raise ValueError(f'image_size={image_size} is too small for AlexNet: pool5 '
                     'would be empty; use at least 67 pixels.')
  return size


class AlexNet(nnx.Module):
  """AlexNet with the paper's two-tower connectivity (Sec. 3.5, Fig. 2).

  conv1 96@11×11/4 → ReLU → LRN → maxpool 3/2 → conv2 256@5×5 pad 2 (tower-local)
  → ReLU → LRN → maxpool → conv3 384@3×3 (cross-tower) → conv4 384@3×3
  (tower-local) → conv5 256@3×3 (tower-local) → maxpool → fc6 4096 → fc7 4096
  → fc8. Dropout 0.5 on the fc6 and fc7 outputs, as Caffe does (Sec. 4.2: "in
  the first two fully-connected layers"). At 227 px and 1000 classes this is
  60,965,224 parameters; Caffe's `bvlc_alexnet` weights map one-to-one.

  Args:
    num_classes: size of fc8.
    image_size: input side in pixels; fixes fc6's input size (paper: 227).
    dropout_rate: Sec. 4.2: 0.5.
    init: 'paper' (Sec. 5) or 'he'.
    dtype: compute dtype; parameters are always float32, logits float32.
    rngs: `nnx.Rngs` with a `params` stream. Dropout draws from the `rngs`
      passed to `__call__`, so the module holds no RNG state.
  """

  def __init__(self, num_classes: int = 1000, *, image_size: int = 227,
               dropout_rate: float = 0.5, init: str = 'paper',
               dtype=jnp.float32, rngs: nnx.Rngs):
    conv = lambda *a, **kw: TowerConv(*a, init=init, dtype=dtype, rngs=rngs, **kw)
    self.conv1 = conv(3, 96, 11, name='conv1', strides=4)
    self.conv2 = conv(96, 256, 5, name='conv2', padding=2, tower_local=True)
    self.conv3 = conv(256, 384, 3, name='conv3', padding=1)
    self.conv4 = conv(384, 384, 3, name='conv4', padding=1, tower_local=True)
    self.conv5 = conv(384, 256, 3, name='conv5', padding=1, tower_local=True)
    flat = pool5_size(image_size) ** 2 * 256

    def dense(name, in_features, out_features):
      kernel_init, bias_init = _initializers(init, name)
      return nnx.Linear(in_features, out_features, kernel_init=kernel_init,
                        bias_init=bias_init, dtype=dtype, rngs=rngs)

    self.fc6 = dense('fc6', flat, 4096)
    self.fc7 = dense('fc7', 4096, 4096)
    self.fc8 = dense('fc8', 4096, num_classes)
    self.dropout = nnx.Dropout(dropout_rate)
    self.dtype = dtype

  def features(self, images: jax.Array) -> jax.Array:
    """pool5 maps `[N, s, s, 256]` (s = 6 at 227 px), towers concatenated."""
    x = _max_pool(_lrn_relu(self.conv1([images])))
    x = _max_pool(_lrn_relu(self.conv2(x)))
    x = [jax.nn.relu(t) for t in self.conv3(x)]
    x = [jax.nn.relu(t) for t in self.conv4(x)]
    x = _max_pool([jax.nn.relu(t) for t in self.conv5(x)])
    return jnp.concatenate(x, axis=-1)

  def __call__(self, images: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Logits for a batch.

    Args:
      images: `[N, image_size, image_size, 3]` float, mean-subtracted (Sec. 2).
      rngs: `nnx.Rngs` with a `dropout` stream; needed in train mode only.

    Returns:
      float32 logits `[N, num_classes]`.
    """
    x = self.features(images)
    x = x.reshape(x.shape[0], -1)  # (h, w, c) order, as Caffe's fc6.
    x = self.dropout(jax.nn.relu(self.fc6(x)), rngs=rngs)
    x = self.dropout(jax.nn.relu(self.fc7(x)), rngs=rngs)
    return self.fc8(x).astype(jnp.float32)
