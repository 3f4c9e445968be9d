"""The per-pixel half of the input, on the device inside the jitted steps: the flip and
PCA lighting that `input_pipeline.preprocess_train` drew for each example, and the
normalisation. Pure JAX: importing this module needs no TensorFlow.
"""

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

# (pixel_mean, pixel_std): per-channel RGB on the 0-255 scale (config.pixel_mean/std).
Normalization = tuple[Sequence[float], Sequence[float]]


def normalize(images: jax.Array, normalization: Normalization) -> jax.Array:
  """(images - mean) / std per channel, float32, any leading shape `[..., 3]`; the
  paper (Sec. 2) subtracts the mean only (std 1)."""
  mean, std = (jnp.asarray(v, jnp.float32) for v in normalization)
  return (images.astype(jnp.float32) - mean) / std


def model_input(batch: Mapping[str, jax.Array], normalization: Normalization | None) -> jax.Array:
  """The model's float32 input from an input-pipeline batch.

  `batch['image']` uint8 `[N, H, W, 3]` (or `[N, C, H, W, 3]` crops) is reflected
  horizontally where `batch['flip']` (bool `[N]`, when present) is True, gets
  `batch['lighting']` (float32 `[N, 3]`, 0-255 RGB, when present) added to every
  pixel, and is normalised: Sec. 4.1's flip and PCA lighting, then Sec. 2's mean
  subtraction, in the order the host applied them before. A float32 'image' is taken
  as model input already (tests and benchmarks feed normalised arrays).

  Raises:
    ValueError: for uint8 images without `normalization`.
  """
  images = batch['image']
  if images.dtype != jnp.uint8:
    return images
  if normalization is None:
    raise ValueError('uint8 images need normalization=(pixel_mean, pixel_std).')
  x = images.astype(jnp.float32)
  # Per example, over its (crops,) H, W: N's draw broadcast along every axis between.
  between = (1,) * (x.ndim - 2)
  if 'flip' in batch:
    flip = jnp.reshape(batch['flip'], (-1, *between, 1))
    x = jnp.where(flip, jnp.flip(x, axis=-2), x)  # Along W, the axis before RGB.
  if 'lighting' in batch:
    x = x + jnp.reshape(batch['lighting'], (-1, *between, 3))
  return normalize(x, normalization)
