"""AlexNet (Krizhevsky, Sutskever & Hinton, NeurIPS 2012) as a Flax NNX module.

The two GPU "towers" of the paper (Sec. 3.2, Fig. 2) are kept explicit: every layer's
output channels are split in two halves; the tower-local layers (conv2, conv4, conv5)
run one convolution per tower rather than a grouped one (3× faster on XLA:CPU).
`AlexNetBN` is You et al. 2017's AlexNet-BN (config.model 'alexnet_bn'), `AlexNetOWT`
torchvision's one-column variant (Krizhevsky 2014), config.model 'alexnet_owt'.
"""

from collections.abc import Sequence
import dataclasses
import functools

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


@dataclasses.dataclass(frozen=True)
class LRNConvention:
  """How a reference reads the paper's LRN constants (Sec. 3.3: k=2, n=5, α=1e-4, β=0.75).

  Attributes:
    k: the additive constant.
    alpha: the coefficient on each squared activation in the window (α as printed,
      or α / n where the reference divides it by the window size).
    across_towers: the window runs over all maps of the layer, crossing the tower
      boundary (one GPU); False keeps it within each tower's maps (two GPUs).
  """

  k: float
  alpha: float
  across_towers: bool


LRN_CONVENTIONS = {
  # cuda-convnet2's LRN arithmetic. cuda-convnet2 is Krizhevsky's 2014 code release,
  # not the code the paper was trained with: its layers-imagenet-2gpu-model.cfg
  # normalises conv1 before the ReLU (rnorm1a reads conv1a, which has no neuron; the
  # ReLU comes with pool1a) and adds a within-map norm after conv2 (cnorm2a/b,
  # type=rnorm); neither is taken here, only the arithmetic: layer.py divides the
  # configured scale by the window (`dic['scale'] /= dic['size']`), and
  # layer-params-imagenet-2gpu-model.cfg sets scale=0.0001, pow=0.75, minDiv=2 for
  # rnorm1a/b and rnorm2a/b, each on one tower's maps (channels=48, 128).
  'cuda-convnet': LRNConvention(k=LRN_K, alpha=LRN_ALPHA / LRN_SIZE, across_towers=False),
  # The paper's formula whole (Sec. 3.3): α as printed multiplies the sum itself, and
  # the sum runs over "n adjacent kernel maps" of "the N kernels in the layer", all of
  # them, so the window crosses from one tower's maps into the other's.
  'paper-text': LRNConvention(k=LRN_K, alpha=LRN_ALPHA, across_towers=True),
  # BVLC Caffe, models/bvlc_alexnet: local_size 5, alpha 1e-4, beta 0.75, k = 1
  # (LRNParameter's default), and lrn_layer.cpp scales by alpha / size; one GPU,
  # so the window crosses from one tower's maps into the other's.
  'caffe': LRNConvention(k=1.0, alpha=LRN_ALPHA / LRN_SIZE, across_towers=True),
}

# Sec. 5: weights ~ N(0, 0.01); biases 1 in conv2, conv4, conv5 and the hidden fc layers.
PAPER_INIT_STDDEV = 0.01
# The parameter layers, in order (the names of Caffe's bvlc_alexnet layers too).
LAYERS = ('conv1', 'conv2', 'conv3', 'conv4', 'conv5', 'fc6', 'fc7', 'fc8')
PAPER_BIAS_ONE_LAYERS = ('conv2', 'conv4', 'conv5', 'fc6', 'fc7')
# The layers whose outputs `AlexNet.activations` gives (DeCAF's features: pool5-fc7).
FEATURE_LAYERS = ('pool5', 'fc6', 'fc7', 'fc8')

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
  the sum clipped to the channels that exist. `alpha` is the coefficient on each
  squared activation, as in TensorFlow's `tf.nn.local_response_normalization(x,
  depth_radius=size // 2, bias=k, alpha=alpha, beta=beta)`. References that divide
  their configured scale by `size` (cuda-convnet2, Caffe, PyTorch's
  `nn.LocalResponseNorm`) are this with `alpha = scale / size`: see `LRN_CONVENTIONS`.

  Its gradient is written out (Caffe's `LRNLayer::CrossChannelBackward`):
  dL/da = g s^-beta - 2 alpha beta a * window_sum(g b / s), with s the denominator's
  base and g = dL/db; autodiff of the formula costs twice as much on CPU.

  It computes in float32 whatever the dtype of `x`: in bfloat16 (8-bit mantissa)
  k + alpha * sum would round to k unless the sum of squares exceeds ~80.

  Args:
    x: activations `[..., C]`, any float dtype; channels on the last axis.
    size: odd window width n over channels (paper: 5).
    k: additive constant (paper: 2).
    alpha: coefficient on each squared activation (paper's text: 1e-4).
    beta: exponent (paper: 0.75).

  Returns:
    Array of the same shape and dtype as `x`.

  Raises:
    ValueError: if `size` is not a positive odd integer.
  """
  if size < 1 or size % 2 == 0:
    raise ValueError(f'LRN size must be a positive odd integer, got {size}.')
  return _lrn(x.astype(jnp.float32), size, k, alpha, beta).astype(x.dtype)


def _channel_window_sum(x: jax.Array, size: int) -> jax.Array:
  """sum_{|j - i| <= size // 2} x[..., j], clipped at the ends: one GEMM for XLA."""
  channels = jnp.arange(x.shape[-1])
  band = (jnp.abs(channels[:, None] - channels[None, :]) <= size // 2).astype(x.dtype)
  return jnp.einsum('...c,cd->...d', x, band)


def _inverse_power(s: jax.Array, beta: float) -> jax.Array:
  """s^-beta; for the paper's beta = 3/4 as rsqrt(s) * rsqrt(s)^(1/2), 2× cheaper
  than a general power (log and exp) on CPU."""
  if beta == 0.75:
    r = jax.lax.rsqrt(s)
    return r * jnp.sqrt(r)
  return jnp.power(s, -beta)


def _lrn_forward(x, size, k, alpha, beta):
  s = k + alpha * _channel_window_sum(jnp.square(x), size)
  scale = _inverse_power(s, beta)
  return x * scale, (x, s, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _lrn(x, size, k, alpha, beta):
  return _lrn_forward(x, size, k, alpha, beta)[0]


def _lrn_backward(size, k, alpha, beta, residuals, g):
  del k
  x, s, scale = residuals
  g_scaled = g * scale
  # The band is symmetric, so the window sum is its own transpose.
  window = _channel_window_sum(g_scaled * x / s, size)
  return (g_scaled - (2 * alpha * beta) * x * window,)


_lrn.defvjp(_lrn_forward, _lrn_backward)


def lrn_across_towers(
  x: jax.Array,
  model_axis: str,
  *,
  size: int = LRN_SIZE,
  k: float = 1.0,
  alpha: float = LRN_ALPHA / LRN_SIZE,
  beta: float = LRN_BETA,
) -> jax.Array:
  """`local_response_norm` over all towers' maps, run per tower inside `shard_map`.

  `x` `[..., C]` holds this device's tower (tower i = index i on `model_axis`); the
  window of its first and last `size // 2` maps reaches into the neighbouring towers,
  so only those edge maps are exchanged (two `ppermute`s of `size // 2` channels),
  never the whole layer. Equal to `local_response_norm` of the towers' maps
  concatenated in tower order (Caffe's one-GPU LRN), then split.
  """
  r = size // 2
  n = jax.lax.axis_size(model_axis)
  # Tower i receives the last r maps of tower i - 1 and the first r of tower i + 1;
  # the outer edges receive zeros, which add nothing to the sum (clipping).
  left = jax.lax.ppermute(x[..., -r:], model_axis, [(i, i + 1) for i in range(n - 1)])
  right = jax.lax.ppermute(x[..., :r], model_axis, [(i + 1, i) for i in range(n - 1)])
  squares = jnp.square(jnp.concatenate([left, x, right], -1).astype(jnp.float32))
  window = sum(squares[..., i : i + x.shape[-1]] for i in range(size))
  y = x.astype(jnp.float32) * _inverse_power(k + alpha * window, beta)
  return y.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def max_pool(x: jax.Array, window: int = 3, stride: int = 2) -> jax.Array:
  """Max over `window`² patches every `stride` pixels, no padding (Sec. 3.4: z=3, s=2).

  `x` `[N, H, W, C]` → `[N, (H - window) // stride + 1, ..., C]`. The forward pass
  is XLA's reduce-window; the gradient goes to the first maximum of each window in
  row-major order, like select-and-scatter (and Caffe, PyTorch), but is computed
  with window² strided compares and pads, 3-5× faster on CPU than XLA's scatter.
  """
  return jax.lax.reduce_window(
    x, -jnp.inf, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1), 'VALID'
  )


def _max_pool_forward(x, window, stride):
  y = max_pool(x, window, stride)
  return y, (x, y)


def _max_pool_backward(window, stride, residuals, g):
  x, y = residuals
  n, height, width, c = x.shape
  zero = jnp.zeros((), x.dtype)
  dx = jnp.zeros_like(x)
  taken = jnp.zeros(y.shape, bool)  # Windows whose maximum was already found.
  for i in range(window):
    for j in range(window):
      end = (i + stride * (y.shape[1] - 1) + 1, j + stride * (y.shape[2] - 1) + 1)
      candidate = jax.lax.slice(x, (0, i, j, 0), (n, *end, c), (1, stride, stride, 1))
      hit = (candidate == y) & ~taken
      taken = taken | hit
      # Scatter back to rows i, i + stride, ...: a pad with stride - 1 between.
      dx = dx + jax.lax.pad(
        jnp.where(hit, g, zero),
        zero,
        ((0, 0, 0), (i, height - end[0], stride - 1), (j, width - end[1], stride - 1), (0, 0, 0)),
      )
  return (dx,)


max_pool.defvjp(_max_pool_forward, _max_pool_backward)


def _initializers(init: str, name: str):
  """Returns (kernel_init, bias_init) for layer `name` under the named scheme."""
  if init == 'paper':
    bias_value = 1.0 if name in PAPER_BIAS_ONE_LAYERS else 0.0
    return (nnx.initializers.normal(PAPER_INIT_STDDEV), nnx.initializers.constant(bias_value))
  if init == 'he':
    # He et al. 2015 (fan-in read from the kernel: what one tower sees); see configs.
    return (
      nnx.initializers.variance_scaling(2.0, 'fan_in', 'normal'),
      nnx.initializers.zeros_init(),
    )
  raise ValueError(f"Unknown init {init!r}: use 'paper' (Sec. 5) or 'he'.")


def _dense(name: str, in_features: int, out_features: int, *, init: str, dtype, rngs):
  """fc6, fc7 or fc8: an `nnx.Linear` drawn as `init` draws layer `name`."""
  kernel_init, bias_init = _initializers(init, name)
  return nnx.Linear(
    in_features,
    out_features,
    kernel_init=kernel_init,
    bias_init=bias_init,
    dtype=dtype,
    rngs=rngs,
  )


def _axis_size(axis_name: str | None) -> int:
  return 1 if axis_name is None else jax.lax.axis_size(axis_name)


def _axis_index(axis_name: str | None) -> jax.Array | int:
  return 0 if axis_name is None else jax.lax.axis_index(axis_name)


def gather_towers(towers: Sequence[jax.Array], model_axis: str | None = None) -> jax.Array:
  """All maps of both towers, concatenated on the last axis (tower 0 first).

  This is where the paper's GPUs "communicate only in certain layers" (Sec. 3.2):
  inside `shard_map` with the towers on `model_axis`, an all-gather over it. Its
  result is the same on both towers ('invarying'), so what follows from it alone
  (fc8's logits) is computed once per tower pair, not summed over the towers.
  """
  x = jnp.concatenate(towers, axis=-1)
  if model_axis is None:
    return x
  return jax.lax.all_gather(x, model_axis, axis=x.ndim - 1, tiled=True, to='invarying')


class TowerConv(nnx.Module):
  """A convolution whose output maps are split over the two towers (Sec. 3.2).

  The kernel is stored as Caffe's grouped `bvlc_alexnet` layout, HWIO with
  I = the input channels one tower sees; output channels `[:out // 2]` belong to
  tower 0. A `tower_local` layer (conv2, conv4, conv5) takes one input per tower
  and connects each tower only to its own maps; otherwise (conv1, conv3) it takes
  all input maps as one array. It returns one NHWC output per tower held here:
  two on one device, one per device when the kernel is sharded over the towers.
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: int,
    *,
    name: str,
    strides: int = 1,
    padding: int = 0,
    tower_local: bool = False,
    init: str = 'paper',
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    groups = NUM_TOWERS if tower_local else 1
    kernel_shape = (kernel_size, kernel_size, in_features // groups, out_features)
    kernel_init, bias_init = _initializers(init, name)
    self.kernel = nnx.Param(kernel_init(rngs.params(), kernel_shape, jnp.float32))
    self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), jnp.float32))
    self.tower_features = out_features // NUM_TOWERS
    self.strides = strides
    self.padding = padding
    self.tower_local = tower_local
    self.dtype = dtype

  def __call__(self, inputs: jax.Array | Sequence[jax.Array]) -> list[jax.Array]:
    # The kernel here is the whole layer, or this device's shard of it.
    num_towers = self.kernel.shape[-1] // self.tower_features
    kernel = self.kernel[...].astype(self.dtype)
    bias = self.bias[...].astype(self.dtype)
    if not self.tower_local:
      # Every tower sees all inputs: one conv over all local output maps, then
      # split, is the same sum and 1.5× faster on CPU than a conv per tower.
      return jnp.split(self._conv(inputs, kernel) + bias, num_towers, axis=-1)
    return [
      self._conv(x, w) + b
      for x, w, b in zip(
        inputs, jnp.split(kernel, num_towers, axis=-1), jnp.split(bias, num_towers), strict=True
      )
    ]

  def _conv(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(
      x.astype(self.dtype),
      kernel,
      (self.strides, self.strides),
      [(self.padding, self.padding)] * 2,
      dimension_numbers=_DIMENSION_NUMBERS,
    )


class Dropout(nnx.Module):
  """Dropout (Sec. 4.2) that drops the same units however the arrays are sharded.

  The keep mask is drawn for the global `[batch, units]` array and this device's
  block is sliced from it, so a run on any mesh equals the one-device run.
  `model.train()` / `model.eval()` switch it via `deterministic`.
  """

  def __init__(self, rate: float):
    self.rate = rate
    self.deterministic = False

  def __call__(
    self,
    x: jax.Array,
    *,
    rngs: nnx.Rngs | None,
    data_axis: str | None = None,
    model_axis: str | None = None,
  ) -> jax.Array:
    if self.deterministic or self.rate == 0.0:
      return x
    if rngs is None:
      raise ValueError(
        'AlexNet in train mode needs rngs=nnx.Rngs(dropout=...); call model.eval() for inference.'
      )
    block = x.shape
    shape = (block[0] * _axis_size(data_axis), block[1] * _axis_size(model_axis))
    start = (_axis_index(data_axis) * block[0], _axis_index(model_axis) * block[1])
    keep = jax.random.bernoulli(rngs.dropout(), 1.0 - self.rate, shape)
    keep = jax.lax.dynamic_slice(keep, start, block)
    return jnp.where(keep, x / (1.0 - self.rate), jnp.zeros_like(x))


def _relu(towers: Sequence[jax.Array]) -> list[jax.Array]:
  return [jax.nn.relu(x) for x in towers]


def _max_pool(towers: Sequence[jax.Array]) -> list[jax.Array]:
  return [max_pool(x) for x in towers]


def _relu_lrn(
  towers: Sequence[jax.Array], lrn: LRNConvention, model_axis: str | None
) -> list[jax.Array]:
  """Sec. 3.3: LRN after the ReLU, within each tower's maps or across both (`lrn`)."""
  towers = _relu(towers)
  norm = functools.partial(local_response_norm, k=lrn.k, alpha=lrn.alpha)
  if not lrn.across_towers:
    return [norm(x) for x in towers]
  if len(towers) == NUM_TOWERS:  # Both towers here: one window over all maps.
    return jnp.split(norm(jnp.concatenate(towers, -1)), NUM_TOWERS, axis=-1)
  return [lrn_across_towers(x, model_axis, k=lrn.k, alpha=lrn.alpha) for x in towers]


def pool5_size(image_size: int) -> int:
  """Side of the pool5 maps for a square input of `image_size` pixels (6 at 227).

  Raises:
    ValueError: if the image is too small for a 1×1 pool5 (< 67 pixels).
  """
  size = (image_size - 11) // 4 + 1  # conv1, stride 4, no padding.
  for _ in range(3):  # pool1, pool2, pool5; conv2..conv5 keep the size.
    size = (size - 3) // 2 + 1
  if size < 1:
    raise ValueError(
      f'image_size={image_size} is too small for AlexNet: pool5 '
      'would be empty; use at least 67 pixels.'
    )
  return size


class AlexNet(nnx.Module):
  """AlexNet with the paper's two-tower connectivity (Sec. 3.5, Fig. 2).

  conv1 96@11×11/4 → ReLU → LRN → maxpool 3/2 → conv2 256@5×5 pad 2 (tower-local)
  → ReLU → LRN → maxpool → conv3 384@3×3 (cross-tower) → conv4 384@3×3
  (tower-local) → conv5 256@3×3 (tower-local) → maxpool → fc6 4096 → fc7 4096
  → fc8. Dropout 0.5 on the fc6 and fc7 outputs, as Caffe does (Sec. 4.2: "in
  the first two fully-connected layers"). At 227 px and 1000 classes this is
  60,965,224 parameters, the shapes of Caffe's `bvlc_alexnet` (whose weights need
  transposes, fc6's row order, conv1's BGR inputs and `lrn='caffe'`: see
  `import_caffe`).

  The same module runs on one device (both towers here) or per device inside
  `shard_map` with its parameters split over the towers (see `sharding.py`).

  Args:
    num_classes: size of fc8.
    image_size: input side in pixels; fixes fc6's input size (paper: 227).
    dropout_rate: Sec. 4.2: 0.5.
    init: 'paper' (Sec. 5) or 'he'.
    lrn: a key of `LRN_CONVENTIONS`: 'cuda-convnet' (cuda-convnet2's LRN
      arithmetic), 'paper-text' (Sec. 3.3 as printed) or 'caffe'.
    dtype: compute dtype; parameters are always float32, logits float32.
    rngs: `nnx.Rngs` with a `params` stream. Dropout draws from the `rngs`
      passed to `__call__`, so the module holds no RNG state.

  Raises:
    ValueError: for an unknown `init` or `lrn`, or an image below 67 pixels.
  """

  def __init__(
    self,
    num_classes: int = 1000,
    *,
    image_size: int = 227,
    dropout_rate: float = 0.5,
    init: str = 'paper',
    lrn: str = 'cuda-convnet',
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    if lrn not in LRN_CONVENTIONS:
      raise ValueError(f'Unknown lrn {lrn!r}: use one of {", ".join(LRN_CONVENTIONS)}.')
    self.lrn = LRN_CONVENTIONS[lrn]
    conv = lambda *a, **kw: TowerConv(*a, init=init, dtype=dtype, rngs=rngs, **kw)
    self.conv1 = conv(3, 96, 11, name='conv1', strides=4)
    self.conv2 = conv(96, 256, 5, name='conv2', padding=2, tower_local=True)
    self.conv3 = conv(256, 384, 3, name='conv3', padding=1)
    self.conv4 = conv(384, 384, 3, name='conv4', padding=1, tower_local=True)
    self.conv5 = conv(384, 256, 3, name='conv5', padding=1, tower_local=True)
    flat = pool5_size(image_size) ** 2 * 256

    dense = functools.partial(_dense, init=init, dtype=dtype, rngs=rngs)
    self.fc6 = dense('fc6', flat, 4096)
    self.fc7 = dense('fc7', 4096, 4096)
    self.fc8 = dense('fc8', 4096, num_classes)
    self.dropout = Dropout(dropout_rate)

  def features(
    self, images: jax.Array, *, data_axis: str | None = None, model_axis: str | None = None
  ) -> jax.Array:
    """pool5 maps `[N, s, s, 256]` (s = 6 at 227 px) of both towers, tower 0 first."""
    del data_axis  # No statistic of the batch here (see `AlexNetBN`).
    towers = _max_pool(_relu_lrn(self.conv1(images), self.lrn, model_axis))
    towers = _max_pool(_relu_lrn(self.conv2(towers), self.lrn, model_axis))
    towers = _relu(self.conv3(gather_towers(towers, model_axis)))
    towers = _relu(self.conv4(towers))
    towers = _max_pool(_relu(self.conv5(towers)))
    return gather_towers(towers, model_axis)

  def __call__(
    self,
    images: jax.Array,
    *,
    rngs: nnx.Rngs | None = None,
    data_axis: str | None = None,
    model_axis: str | None = None,
  ) -> jax.Array:
    """Logits for a batch.

    Args:
      images: `[N, image_size, image_size, 3]` float, mean-subtracted (Sec. 2).
      rngs: `nnx.Rngs` with a `dropout` stream; needed in train mode only.
      data_axis, model_axis: inside `shard_map`, the mesh axes that split the
        batch and the towers; None on one device.

    Returns:
      float32 logits `[N, num_classes]`.

    Raises:
      ValueError: in train mode without `rngs`.
    """
    return self.activations(images, 'fc8', rngs=rngs, data_axis=data_axis, model_axis=model_axis)

  def activations(
    self,
    images: jax.Array,
    layer: str,
    *,
    rngs: nnx.Rngs | None = None,
    data_axis: str | None = None,
    model_axis: str | None = None,
  ) -> jax.Array:
    """The output of `layer` (one of `FEATURE_LAYERS`), both towers', float32 `[N, D]`.

    'pool5': the pool5 maps flattened in (h, w, c) order, as fc6 reads them
    (D = s² · 256: 9216 at 227 px, 256 at 67 px; Caffe's pool5 blob is (c, h, w)).
    'fc6', 'fc7': after the ReLU, as Caffe's blobs (its ReLUs are in place) and
    DeCAF's features; after dropout too in train mode, none in eval mode. 'fc8': the
    logits (`__call__`). Inside `shard_map` the towers' units are gathered over
    `model_axis`, so the result is whole on every tower. Arguments as `__call__`'s.

    Raises:
      ValueError: for another `layer`; in train mode without `rngs`.
    """
    if layer not in FEATURE_LAYERS:
      raise ValueError(f'Unknown layer {layer!r}: use one of {", ".join(FEATURE_LAYERS)}.')
    dropout = functools.partial(self.dropout, rngs=rngs, data_axis=data_axis, model_axis=model_axis)
    x = self.features(images, data_axis=data_axis, model_axis=model_axis)
    # (h, w, c) order; Caffe's fc6 reads (c, h, w), so imported rows are permuted.
    x = x.reshape(x.shape[0], -1)
    if layer == 'pool5':
      return x.astype(jnp.float32)
    x = gather_towers([dropout(jax.nn.relu(self.fc6(x)))], model_axis)
    if layer == 'fc6':
      return x.astype(jnp.float32)
    x = gather_towers([dropout(jax.nn.relu(self.fc7(x)))], model_axis)
    if layer == 'fc7':
      return x.astype(jnp.float32)
    return self.fc8(x).astype(jnp.float32)


# You, Gitman & Ginsburg 2017's AlexNet-BN as their NVIDIA Caffe fork trains it with
# LARS (models/alexnet_bn/train_val2.prototxt, which solver.prototxt and, as
# train_val2_fp16.prototxt, solver_8K/16k/32k.prototxt run): every BatchNorm layer has
# moving_average_fraction 0.9 and eps 1e-4.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-4


class TowerBatchNorm(nnx.Module):
  """Batch normalization without a learned scale or shift, per channel of the towers.

  Train mode: y = (x - μ) / sqrt(σ² + eps), μ and σ² the mean and (biased) variance
  of each channel over the batch and the spatial positions; the running averages move
  as r <- momentum * r + (1 - momentum) * batch value (NVIDIA Caffe's
  batch_norm_layer.cpp, `moving_average_fraction`). Eval mode (`model.eval()`, which
  sets `use_running_average`): μ, σ² are the running averages. Inside `shard_map`
  the statistics are pmean'd over `data_axis`: those of the global batch, as one
  device computes them (the devices hold equal shares of it). A channel is normalised
  on its own, so each tower's channels, on whatever device, need no other tower's.

  Running averages start at mean 0 and variance 1 (as Flax's and PyTorch's BatchNorm;
  NVIDIA Caffe copies the first batch's, and blends σ² + eps where this blends σ²).
  They are `nnx.BatchStat`s named 'mean' and 'var', float32 `[C]`, tower 0's channels
  first; the statistics are computed in float32 whatever the activations' dtype.
  """

  def __init__(
    self, num_features: int, *, momentum: float = BN_MOMENTUM, epsilon: float = BN_EPSILON
  ):
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
    self.tower_features = num_features // NUM_TOWERS
    self.momentum = momentum
    self.epsilon = epsilon
    self.use_running_average = False

  def __call__(
    self, towers: Sequence[jax.Array], *, data_axis: str | None = None
  ) -> list[jax.Array]:
    """`towers`: this device's towers `[N, H, W, C / 2]` each; returns them normalised."""
    if self.use_running_average:
      means, variances = self.mean[...], self.var[...]
    else:
      means, variances = _batch_moments(towers, data_axis)
      m = self.momentum
      self.mean[...] = m * self.mean[...] + (1 - m) * jax.lax.stop_gradient(means)
      self.var[...] = m * self.var[...] + (1 - m) * jax.lax.stop_gradient(variances)
    scale = jax.lax.rsqrt(variances + self.epsilon)
    return [
      ((x.astype(jnp.float32) - mean) * s).astype(x.dtype)
      for x, mean, s in zip(
        towers,
        jnp.split(means, len(towers)),
        jnp.split(scale, len(towers)),
        strict=True,
      )
    ]


def _batch_moments(
  towers: Sequence[jax.Array], data_axis: str | None
) -> tuple[jax.Array, jax.Array]:
  """Per-channel mean and biased variance of the towers' channels, float32 `[C]`,
  over every axis but the last and, inside `shard_map`, over `data_axis` (two passes:
  the variance is the mean of squared deviations from the global mean)."""

  def global_mean(x):
    mean = jnp.mean(x, axis=tuple(range(x.ndim - 1)))
    return mean if data_axis is None else jax.lax.pmean(mean, data_axis)

  towers = [x.astype(jnp.float32) for x in towers]
  means = [global_mean(x) for x in towers]
  variances = [global_mean(jnp.square(x - mean)) for x, mean in zip(towers, means, strict=True)]
  return jnp.concatenate(means), jnp.concatenate(variances)


# The layers of AlexNet-BN that read a batch-normalised input (see `AlexNetBN`).
BN_LAYERS = ('conv2', 'conv3', 'conv4', 'conv5')


class AlexNetBN(AlexNet):
  """You, Gitman & Ginsburg 2017's AlexNet-BN ("Large Batch Training of Convolutional
  Networks", arXiv:1708.03888: AlexNet with batch normalization in place of its LRN),
  on the paper's two towers.

  The paper does not say where the BN layers go; this follows the prototxt its
  authors' LARS solvers train, NVIDIA/caffe models/alexnet_bn/train_val2.prototxt
  (solver.prototxt; its fp16 twin for solver_8K/16k/32k.prototxt): no LRN, and a
  BatchNorm without scale or shift (scale_bias: false) on the input of conv2, conv3,
  conv4 and conv5 (`BN_LAYERS`): after pool1 (bn2), after pool2 (bn3), after conv3's
  ReLU (bn4) and after conv4's ReLU (bn5); conv1 and the fc layers read no BN. The
  same directory's train_val.prototxt, which no solver there uses, instead puts a BN
  with scale and shift after each of conv1-conv5 (before the ReLU); not taken here.

  conv1 → ReLU → pool1 → bn2 → conv2 → ReLU → pool2 → bn3 → conv3 → ReLU → bn4 →
  conv4 → ReLU → bn5 → conv5 → ReLU → pool5 → fc6 → fc7 → fc8, dropout as `AlexNet`.
  Its parameters are `AlexNet`'s (BN learns none); bn2...bn5 hold the running
  averages (`TowerBatchNorm`, momentum 0.9, eps 1e-4 as the prototxt). The layers'
  initial values follow `init` as for `AlexNet` (the prototxt's fillers differ).

  Arguments as `AlexNet`'s, without `lrn`.
  """

  def __init__(
    self,
    num_classes: int = 1000,
    *,
    image_size: int = 227,
    dropout_rate: float = 0.5,
    init: str = 'paper',
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    super().__init__(
      num_classes,
      image_size=image_size,
      dropout_rate=dropout_rate,
      init=init,
      dtype=dtype,
      rngs=rngs,
    )
    del self.lrn
    self.bn2 = TowerBatchNorm(96)
    self.bn3 = TowerBatchNorm(256)
    self.bn4 = TowerBatchNorm(384)
    self.bn5 = TowerBatchNorm(384)

  def features(
    self, images: jax.Array, *, data_axis: str | None = None, model_axis: str | None = None
  ) -> jax.Array:
    """pool5 maps `[N, s, s, 256]`, as `AlexNet.features`; `data_axis` as `__call__`'s."""
    towers = _max_pool(_relu(self.conv1(images)))
    towers = _max_pool(_relu(self.conv2(self.bn2(towers, data_axis=data_axis))))
    towers = self.bn3(towers, data_axis=data_axis)
    towers = _relu(self.conv3(gather_towers(towers, model_axis)))
    towers = _relu(self.conv4(self.bn4(towers, data_axis=data_axis)))
    towers = _max_pool(_relu(self.conv5(self.bn5(towers, data_axis=data_axis))))
    return gather_towers(towers, model_axis)


# torchvision's AlexNet (torchvision/models/alexnet.py): Krizhevsky 2014, "One weird trick
# for parallelizing convolutional neural networks", one column, 224 px.
# (output channels, kernel, stride, padding) of conv1..conv5; maxpool 3/2 after conv1,
# conv2 and conv5.
OWT_CONVS = {
  'conv1': (64, 11, 4, 2),
  'conv2': (192, 5, 1, 2),
  'conv3': (384, 3, 1, 1),
  'conv4': (256, 3, 1, 1),
  'conv5': (256, 3, 1, 1),
}
# nn.AdaptiveAvgPool2d((6, 6)) before the classifier: fc6 reads 256 · 6 · 6 = 9216 inputs
# at any image size.
OWT_POOL5_SIZE = 6


def owt_pool5_size(image_size: int) -> int:
  """Side of torchvision AlexNet's last max-pooled maps for `image_size` px (6 at 224),
  before the adaptive average pool brings them to 6 × 6.

  Raises:
    ValueError: below 63 pixels (torchvision's `min_size`), where they would be empty.
  """
  size = (image_size + 2 * 2 - 11) // 4 + 1  # conv1: stride 4, padding 2.
  for _ in range(3):  # pool1, pool2, pool5; conv2..conv5 keep the size.
    size = (size - 3) // 2 + 1
  if size < 1:
    raise ValueError(
      f"image_size={image_size} is too small for torchvision's AlexNet: its last "
      'pooled maps would be empty; use at least 63 pixels.'
    )
  return size


def _adaptive_pool_matrix(in_size: int, out_size: int) -> jax.Array:
  """float32 `[out, in]`: row i averages inputs floor(i·in/out) .. ceil((i+1)·in/out) - 1,
  PyTorch's AdaptiveAvgPool bins (aten/src/ATen/native/AdaptiveAveragePooling.cpp,
  start_index / end_index); bins overlap when `in` is not a multiple of `out`."""
  weights = [[0.0] * in_size for _ in range(out_size)]
  for i in range(out_size):
    start, end = (i * in_size) // out_size, -(-((i + 1) * in_size) // out_size)
    for j in range(start, end):
      weights[i][j] = 1.0 / (end - start)
  return jnp.asarray(weights, jnp.float32)


def adaptive_avg_pool(x: jax.Array, out_size: int) -> jax.Array:
  """PyTorch's `nn.AdaptiveAvgPool2d(out_size)` on NHWC: `[N, H, W, C]` → `[N, out_size,
  out_size, C]`, each output the mean of its rectangular bin (`_adaptive_pool_matrix`:
  rows then columns, which averages the same rectangle). The identity when H = W =
  out_size (224 px for torchvision's AlexNet). Computed in float32 at full precision
  (no TF32 or bfloat16 passes), returned in `x`'s dtype."""
  _, height, width, _ = x.shape
  if height == width == out_size:
    return x
  highest = jax.lax.Precision.HIGHEST
  y = jnp.einsum(
    'ih,nhwc->niwc',
    _adaptive_pool_matrix(height, out_size),
    x.astype(jnp.float32),
    precision=highest,
  )
  y = jnp.einsum('jw,niwc->nijc', _adaptive_pool_matrix(width, out_size), y, precision=highest)
  return y.astype(x.dtype)


class AlexNetOWT(nnx.Module):
  """torchvision's AlexNet (`torchvision.models.alexnet`), the one-column network of
  Krizhevsky 2014 ("One weird trick for parallelizing convolutional neural networks").

  conv1 64@11×11/4 pad 2 → ReLU → maxpool 3/2 → conv2 192@5×5 pad 2 → ReLU → maxpool
  → conv3 384@3×3 → conv4 256@3×3 → conv5 256@3×3 (each pad 1, ReLU) → maxpool →
  adaptive average pool to 6×6 → dropout → fc6 4096 → ReLU → dropout → fc7 4096 →
  ReLU → fc8. Unlike `AlexNet`: no LRN, no towers (every layer reads all maps of the
  one below), fewer maps in conv1, conv2, conv4, dropout before fc6 and fc7 rather
  than after, and 224-px inputs; 61,100,840 parameters at 1000 classes (torchvision's
  `num_params`). Parameters are named as `AlexNet`'s (`LAYERS`), conv kernels HWIO,
  dense kernels `(in, out)`, fc6's rows in (h, w, c) order (`import_torchvision`
  converts torchvision's state dict).

  On a mesh with 'model' of size 2 the layers' output maps are split over it by the
  same `sharding.PARTITION_RULES` as `AlexNet`'s (tensor parallelism): each device
  computes its half of a layer's maps from all of the layer's inputs, and the halves
  are all-gathered after every layer, so it computes what one device computes.

  Args:
    num_classes: size of fc8.
    image_size: input side in pixels (torchvision: 224; at least 63).
    dropout_rate: torchvision's `dropout`, 0.5.
    init: 'paper' (Sec. 5 of the 2012 paper) or 'he'; torchvision draws PyTorch's
      layer defaults instead (not reproduced).
    dtype: compute dtype; parameters are always float32, logits float32.
    rngs: `nnx.Rngs` with a `params` stream.

  Raises:
    ValueError: for an unknown `init`, or an image below 63 pixels.
  """

  def __init__(
    self,
    num_classes: int = 1000,
    *,
    image_size: int = 224,
    dropout_rate: float = 0.5,
    init: str = 'paper',
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    owt_pool5_size(image_size)
    in_features = 3
    for name, (out_features, kernel_size, strides, padding) in OWT_CONVS.items():
      # Not tower-local: every output map reads all inputs; its 'towers' are the
      # halves of the maps that a 'model' axis of size 2 puts on each device.
      conv = TowerConv(
        in_features,
        out_features,
        kernel_size,
        name=name,
        strides=strides,
        padding=padding,
        init=init,
        dtype=dtype,
        rngs=rngs,
      )
      setattr(self, name, conv)
      in_features = out_features

    dense = functools.partial(_dense, init=init, dtype=dtype, rngs=rngs)
    self.fc6 = dense('fc6', OWT_POOL5_SIZE**2 * in_features, 4096)
    self.fc7 = dense('fc7', 4096, 4096)
    self.fc8 = dense('fc8', 4096, num_classes)
    self.dropout = Dropout(dropout_rate)

  def features(
    self, images: jax.Array, *, data_axis: str | None = None, model_axis: str | None = None
  ) -> jax.Array:
    """The adaptive pool's maps `[N, 6, 6, 256]`, whole on every device (`data_axis`
    unused: no layer reads other devices' rows)."""
    del data_axis
    x = images
    for name in OWT_CONVS:
      x = jax.nn.relu(gather_towers(getattr(self, name)(x), model_axis))
      if name in ('conv1', 'conv2', 'conv5'):
        x = max_pool(x)
    return adaptive_avg_pool(x, OWT_POOL5_SIZE)

  def __call__(
    self,
    images: jax.Array,
    *,
    rngs: nnx.Rngs | None = None,
    data_axis: str | None = None,
    model_axis: str | None = None,
  ) -> jax.Array:
    """Logits for a batch: as `AlexNet.__call__`, from `[N, H, W, 3]` images normalised
    as torchvision's (RGB on [0, 1], ImageNet mean and std: configs/torchvision_alexnet.py)."""
    return self.activations(images, 'fc8', rngs=rngs, data_axis=data_axis, model_axis=model_axis)

  def activations(
    self,
    images: jax.Array,
    layer: str,
    *,
    rngs: nnx.Rngs | None = None,
    data_axis: str | None = None,
    model_axis: str | None = None,
  ) -> jax.Array:
    """The output of `layer` (one of `FEATURE_LAYERS`), float32 `[N, D]`, whole on every
    device; arguments as `AlexNet.activations`.

    'pool5': the adaptive pool's 6×6×256 maps flattened in (h, w, c) order (D = 9216
    at any image size; torchvision's `flatten` is (c, h, w)). 'fc6', 'fc7': after the
    ReLU (torchvision's dropout comes before fc6 and fc7, so in train mode the pool5
    and fc6 outputs that the next layer reads are dropped, not these). 'fc8': logits.

    Raises:
      ValueError: for another `layer`; in train mode without `rngs`.
    """
    if layer not in FEATURE_LAYERS:
      raise ValueError(f'Unknown layer {layer!r}: use one of {", ".join(FEATURE_LAYERS)}.')
    # The dropped arrays are whole on every device of 'model' (gathered): one mask for
    # them all, drawn for the global batch (model_axis None).
    dropout = functools.partial(self.dropout, rngs=rngs, data_axis=data_axis)
    x = self.features(images, model_axis=model_axis)
    x = x.reshape(x.shape[0], -1)
    if layer == 'pool5':
      return x.astype(jnp.float32)
    x = jax.nn.relu(gather_towers([self.fc6(dropout(x))], model_axis))
    if layer == 'fc6':
      return x.astype(jnp.float32)
    x = jax.nn.relu(gather_towers([self.fc7(dropout(x))], model_axis))
    if layer == 'fc7':
      return x.astype(jnp.float32)
    return self.fc8(x).astype(jnp.float32)
