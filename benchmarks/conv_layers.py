"""Times each AlexNet convolution alone: forward, input gradient, kernel gradient.

  python -m benchmarks.conv_layers [--batch_size=64] [--image_size=227]

Needs no TensorFlow. One tower's convolution for the tower-local layers (conv2, conv4,
conv5: the step runs two), the whole layer for conv1 and conv3 (one convolution over
both towers' output maps, as `models.TowerConv` runs them); jitted with the train
step's `steps.compiler_options()`, float32, median of windows. The step needs no input
gradient for conv1 (its input is the image); it is timed anyway. GFLOP/s count 2
FLOPs per multiply-add of the unpadded convolution; compare them with the 4096³ matmul
peak that `train_throughput` prints.
"""

import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from flax import nnx

from alexnet_jax import models
from alexnet_jax import steps

_BATCH_SIZE = flags.DEFINE_integer('batch_size', 64, 'Batch size.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 227, 'Input side in pixels.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Calls per timed window (3 windows).')


def layers(image_size: int) -> list[tuple[str, int, int, int, int, int, int]]:
  """(name, input side, input channels, output channels, kernel, stride, padding) per
  convolution as the train step runs it, read from `models.AlexNet` (Sec. 3.5, Fig. 2)."""
  model = nnx.eval_shape(lambda: models.AlexNet(image_size=image_size, rngs=nnx.Rngs(0)))
  pool = lambda side: (side - 3) // 2 + 1  # max_pool's 3×3 windows every 2 pixels.
  conv1 = model.conv1
  pool1 = pool((image_size - conv1.kernel.shape[0]) // conv1.strides + 1)
  pool2 = pool(pool1)  # conv2 keeps the size (padding 2).
  sides = {'conv1': image_size, 'conv2': pool1, 'conv3': pool2, 'conv4': pool2, 'conv5': pool2}
  rows = []
  for name, side in sides.items():
    conv = getattr(model, name)
    k, _, c_in, c_out = conv.kernel.shape
    if conv.tower_local:  # One tower: its half of the output maps.
      name, c_out = f'{name} (one tower)', c_out // models.NUM_TOWERS
    rows.append((name, side, c_in, c_out, k, conv.strides, conv.padding))
  return rows


def milliseconds(fn, *args) -> float:
  fn = jax.jit(fn, compiler_options=steps.compiler_options())
  jax.block_until_ready(fn(*args))
  windows = []
  for _ in range(3):
    start = time.perf_counter()
    for _ in range(_REPEATS.value):
      out = fn(*args)
    jax.block_until_ready(out)
    windows.append((time.perf_counter() - start) / _REPEATS.value * 1e3)
  return statistics.median(windows)


def main(argv):
  del argv
  n = _BATCH_SIZE.value
  print(f'{jax.devices()[0].device_kind}, batch {n}, {_IMAGE_SIZE.value} px, float32')
  for name, side, c_in, c_out, k, stride, pad in layers(_IMAGE_SIZE.value):
    x = jax.random.normal(jax.random.key(0), (n, side, side, c_in))
    kernel = jax.random.normal(jax.random.key(1), (k, k, c_in, c_out)) * 0.01

    def conv(x, kernel, stride=stride, pad=pad):
      return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), [(pad, pad)] * 2, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
      )

    g = jnp.ones(jax.eval_shape(conv, x, kernel).shape)
    out_side = g.shape[1]
    gflop = 2 * n * out_side**2 * c_out * k * k * c_in / 1e9
    times = {
      'forward': milliseconds(conv, x, kernel),
      'input grad': milliseconds(
        lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0], x, kernel, g
      ),
      'kernel grad': milliseconds(
        lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0], x, kernel, g
      ),
    }
    cells = '  '.join(
      f'{k} {ms:6.1f} ms ({gflop / ms * 1e3:3.0f} GFLOP/s)' for k, ms in times.items()
    )
    print(f'{name:18s} {gflop:5.2f} GFLOP  {cells}')


if __name__ == '__main__':
  app.run(main)
