"""Caffe's and PyTorch's weight layouts as this project's, for the importers
(`import_caffe`, `import_torchvision`): both store a convolution's kernel as
(out, in, h, w) and a dense layer's as (out, in), and flatten pool5 in (c, h, w) order.
"""

import ml_collections
import numpy as np

from alexnet_jax import config_lib


def conv_kernel(weights: np.ndarray) -> np.ndarray:
  """(out, in, h, w) → HWIO (h, w, in, out), float32, contiguous."""
  return np.ascontiguousarray(weights.transpose(2, 3, 1, 0), np.float32)


def dense_kernel(weights: np.ndarray, pool5_side: int | None = None) -> np.ndarray:
  """(out, in) → (in, out), float32, contiguous. For fc6 (`pool5_side` s given) the
  rows are also reordered from the (c, h, w) flatten order of Caffe's and PyTorch's
  pool5 to the model's (h, w, c) (`models.AlexNet.activations`)."""
  fan_out, fan_in = weights.shape
  if pool5_side is None:
    return np.ascontiguousarray(weights.T, np.float32)
  weights = weights.reshape(fan_out, fan_in // pool5_side**2, pool5_side, pool5_side)
  kernel = weights.transpose(2, 3, 1, 0).reshape(fan_in, fan_out)
  return np.ascontiguousarray(kernel, np.float32)


def check_conventions(
  config: ml_collections.ConfigDict, conventions: dict, weights_name: str, config_file: str
):
  """Refuses a config under which `weights_name`'s weights compute another function.

  Args:
    conventions: {config key: the value the weights were trained under}.
    config_file: the shipped config that holds them, named in the message.

  Raises:
    config_lib.ConfigError: naming each key of `conventions` that differs.
  """
  wrong = [
    f'config.{key}={config[key]!r} ({weights_name}: {value!r})'
    for key, value in conventions.items()
    if (tuple(config[key]) if isinstance(value, tuple) else config[key]) != value
  ]
  if wrong:
    raise config_lib.ConfigError(
      f'{weights_name} weights compute another function under {"; ".join(wrong)}: import '
      f'with --config={config_file} (or a config built on it).'
    )
