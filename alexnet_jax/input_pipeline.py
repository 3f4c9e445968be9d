"""tf.data input: TFDS datasets, the paper's augmentation (Sec. 4.1), padded evaluation.

All images are float32 RGB on the 0-255 pixel scale until `normalize`. Random ops
are stateless, seeded by (config.seed, example index), so a resumed run sees
exactly the batches an uninterrupted one would.
"""

import dataclasses
from collections.abc import Callable, Iterator

from absl import logging
import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from alexnet_jax import datasets

# Sec. 4.1 PCA ("fancy PCA") lighting: eigen-decomposition of the ImageNet RGB pixel
# covariance, as published with fb.resnet.torch (pixels scaled to [0, 1]).
IMAGENET_EIGVALS = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVECS = ((-0.5675, 0.7192, 0.4009),
                    (-0.5808, -0.0045, -0.8140),
                    (-0.5836, -0.6948, 0.4203))

# --------------------------------------------------------------------------------------
# Augmentation (per example, float32 [H, W, 3] in 0-255).


def resize_shorter_side(image: tf.Tensor, size: int) -> tf.Tensor:
  """Bilinear resize so the shorter side is `size` pixels (Sec. 2: 256 for ImageNet)."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = size / tf.reduce_min(shape)
  new_shape = tf.cast(tf.round(shape * scale), tf.int32)
  return tf.image.resize(image, tf.maximum(new_shape, size), antialias=True)


def central_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """The central `size`×`size` patch."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  top, left = (h - size) // 2, (w - size) // 2
  return image[top:top + size, left:left + size]


def ten_crops(image: tf.Tensor, size: int) -> tf.Tensor:
  """The paper's test patches (Sec. 4.1), float32 `[10, size, size, 3]` from `[H, W, 3]`.

  In order: top-left, top-right, bottom-left, bottom-right and central patch, then
  the same five reflected horizontally.
  """
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  corners = [image[:size, :size], image[:size, w - size:],
             image[h - size:, :size], image[h - size:, w - size:]]
  patches = tf.stack([*corners, central_crop(image, size)])
  return tf.concat([patches, tf.reverse(patches, axis=[2])], axis=0)


def random_crop(image: tf.Tensor, size: int, seed: tf.Tensor) -> tf.Tensor:
  """A uniformly placed `size`×`size` patch (Sec. 4.1: 224×224 of 256×256)."""
  return tf.image.stateless_random_crop(image, (size, size, 3), seed=seed)


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Horizontal reflection with probability 1/2 (Sec. 4.1)."""
  return tf.image.stateless_random_flip_left_right(image, seed=seed)


def pca_lighting(image: tf.Tensor, stddev: float, seed: tf.Tensor) -> tf.Tensor:
  """Adds V · (α ∘ λ) to every pixel, α ~ N(0, stddev) per image (Sec. 4.1, 0.1).

  λ, V: `IMAGENET_EIGVALS` (scaled to 0-255 here) and `IMAGENET_EIGVECS` (columns).
  """
  alpha = tf.random.stateless_normal([3], seed=seed, stddev=stddev)
  eigvals = tf.constant(IMAGENET_EIGVALS) * 255.0
  offset = tf.linalg.matvec(tf.constant(IMAGENET_EIGVECS), alpha * eigvals)
  return image + offset


def normalize(image: tf.Tensor, mean, std) -> tf.Tensor:
  """(image - mean) / std per channel; the paper (Sec. 2) subtracts the mean only."""
  return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def inception_crop(encoded: tf.Tensor, size: int, seed: tf.Tensor) -> tf.Tensor:
  """Random-resized crop (Szegedy et al. 2015): 8-100% of the area, aspect 3/4-4/3.

  Not the paper's augmentation; torchvision's AlexNet recipe uses it, the original
  (and Caffe's bvlc_alexnet) use `random_crop` of the 256² image. JPEGs are decoded
  only inside the crop window.
  """
  is_jpeg = tf.io.is_jpeg(encoded)
  shape = tf.cond(is_jpeg, lambda: tf.io.extract_jpeg_shape(encoded),
                  lambda: tf.shape(tf.io.decode_image(encoded, channels=3,
                                                      expand_animations=False)))
  top_left, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, tf.zeros([1, 0, 4]), seed=seed, min_object_covered=0.0,
      aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  window = tf.stack([top_left[0], top_left[1], crop_size[0], crop_size[1]])
  image = tf.cond(
      is_jpeg, lambda: tf.image.decode_and_crop_jpeg(encoded, window, channels=3),
      lambda: tf.slice(tf.io.decode_image(encoded, channels=3, expand_animations=False),
                       top_left, crop_size))
  return tf.image.resize(tf.cast(image, tf.float32), (size, size), antialias=True)


def decode(encoded: tf.Tensor) -> tf.Tensor:
  """PNG/JPEG bytes → float32 [H, W, 3]; grayscale is replicated to RGB."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  return tf.cast(image, tf.float32)


def preprocess_train(encoded, seed, config: ml_collections.ConfigDict) -> tf.Tensor:
  """Decode, crop (`config.augment.crop`), flip, PCA lighting, normalize; `seed` int [2].

  Raises (inside tf.data): InvalidArgumentError for undecodable bytes.
  """
  crop_seed, flip_seed, light_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 3))
  if config.augment.crop == 'inception':
    image = inception_crop(encoded, config.image_size, crop_seed)
  elif config.augment.crop == 'paper':
    image = resize_shorter_side(decode(encoded), config.resize_size)
    image = central_crop(image, config.resize_size)
    image = random_crop(image, config.image_size, crop_seed)
  else:
    raise ValueError(f"Unknown augment.crop {config.augment.crop!r}: use 'paper' or "
                     "'inception'.")
  if config.augment.flip:
    image = random_flip(image, flip_seed)
  if config.augment.pca_lighting_stddev > 0:
    image = pca_lighting(image, config.augment.pca_lighting_stddev, light_seed)
  return normalize(image, config.pixel_mean, config.pixel_std)


def preprocess_eval(encoded, config: ml_collections.ConfigDict, crops: int = 1) -> tf.Tensor:
  """Decode, resize, crop, normalize: `[S, S, 3]`, or `[10, S, S, 3]` for `crops=10`.

  1 crop is the central patch of the resized image; 10 are `ten_crops` of its
  central resize_size×resize_size square, as the paper tests (Sec. 4.1).

  Raises:
    ValueError: if `crops` is not 1 or 10.
  """
  image = resize_shorter_side(decode(encoded), config.resize_size)
  if crops == 1:
    image = central_crop(image, config.image_size)
  elif crops == 10:
    image = ten_crops(central_crop(image, config.resize_size), config.image_size)
  else:
    raise ValueError(f'crops={crops}: use 1 (central patch) or 10 (Sec. 4.1).')
  return normalize(image, config.pixel_mean, config.pixel_std)


# --------------------------------------------------------------------------------------
# Batches.


def _read_process_part(builder: tfds.core.DatasetBuilder, split: str) -> tf.data.Dataset:
  """This process's part of `split` (all of it in a single-process run), images encoded.

  Each process then makes its own rows of every global batch.
  """
  decoders = {'image': tfds.decode.SkipDecoding()}
  if jax.process_count() == 1:
    return builder.as_dataset(split=split, decoders=decoders)
  if isinstance(builder, tfds.ImageFolder):  # It has no sub-splits.
    return builder.as_dataset(split=split, decoders=decoders).shard(
        jax.process_count(), jax.process_index())
  return builder.as_dataset(split=tfds.split_for_jax_process(split), decoders=decoders)


@dataclasses.dataclass(frozen=True)
class Datasets:
  """Sizes and batch iterators of one dataset's train and test splits.

  Batches hold this process's rows (all of them in a single-process run), as numpy:
  'image' float32 [B, S, S, 3], 'label' int32 [B]; test batches also carry 'mask' [B]
  (0 on padding; the last batch is padded), and `test_batches(crops=10)` gives
  'image' [B, 10, S, S, 3] (`ten_crops`).
  """
  num_train_examples: int  # Over all processes.
  num_test_examples: int  # This process's.
  train_batches: Callable[..., Iterator[dict[str, np.ndarray]]]
  test_batches: Callable[..., Iterator[dict[str, np.ndarray]]]


def create_datasets(config: ml_collections.ConfigDict) -> Datasets:
  """Prepares `config.dataset` if needed and returns its input pipelines.

  Raises:
    FileNotFoundError: if the dataset's source files are missing.
    ValueError: if the dataset's class count differs from `config.num_classes`.
  """
  builder = datasets.builder(config)
  num_classes = builder.info.features['label'].num_classes
  if num_classes != config.num_classes:
    raise ValueError(f'{config.dataset} has {num_classes} classes but config.num_classes='
                     f'{config.num_classes}; set --config.num_classes={num_classes}.')
  train = _read_process_part(builder, config.train_split)
  test = _read_process_part(builder, config.test_split)
  batch_size = config.batch_size // jax.process_count()
  eval_batch_size = config.eval_batch_size // jax.process_count()
  options = tf.data.Options()
  options.deterministic = config.deterministic_input

  def train_batches(start_step: int = 0):
    """Endless batches from step `start_step` on; the same for a given config.seed."""
    ds = train.map(lambda ex: (ex['image'], ex['label']))
    if config.cache:
      ds = ds.cache()
    ds = ds.shuffle(config.shuffle_buffer, seed=config.seed, reshuffle_each_iteration=True)
    # Skip still-encoded examples, so resuming costs no decoding.
    ds = ds.repeat().enumerate().skip(start_step * batch_size)

    def preprocess(index, example):
      encoded, label = example
      seed = tf.stack([tf.constant(config.seed, tf.int64), index])
      return {'image': preprocess_train(encoded, seed, config),
              'label': tf.cast(label, tf.int32), 'index': index}

    ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return _skip_counted(ds.with_options(options).as_numpy_iterator(),
                         start_step * batch_size, 'train')

  def test_batches(crops: int = 1):
    """Every decodable test example once, in order, the last batch padded and masked."""
    ds = test.enumerate().map(
        lambda index, ex: {'image': preprocess_eval(ex['image'], config, crops),
                           'label': tf.cast(ex['label'], tf.int32), 'index': index},
        num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
    ds = ds.batch(eval_batch_size).prefetch(tf.data.AUTOTUNE)
    batches = ds.with_options(options).as_numpy_iterator()
    for batch in _skip_counted(batches, 0, 'test', total=int(test.cardinality())):
      yield pad_batch(batch, eval_batch_size)

  return Datasets(
      num_train_examples=int(train.cardinality()) * jax.process_count(),
      num_test_examples=int(test.cardinality()),
      train_batches=train_batches, test_batches=test_batches)


def _skip_counted(batches: Iterator[dict[str, np.ndarray]], first_index: int,
                  split: str, total: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Drops the 'index' key, logging how many examples failed to decode so far.

  Undecodable examples are left out by `ignore_errors`; the gaps in the stream's
  indices count them, and for a finite split of `total` examples, the shortfall at
  the end. (A resumed run skips raw examples, so each one left out before the
  checkpoint shifts its later batches by one example.)
  """
  seen, skipped = 0, 0

  def report(missing):
    nonlocal skipped
    if missing > skipped:
      skipped = missing
      logging.warning('%s: skipped %d undecodable image(s) so far.', split, skipped)

  for batch in batches:
    index = batch.pop('index')
    seen += len(index)
    report(int(index[-1]) + 1 - first_index - seen)
    yield batch
  if total is not None:
    report(total - seen)


def pad_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  """Pads every array to `size` rows with zeros and adds 'mask' (1 = real example)."""
  n = len(batch['label'])
  padded = {k: np.concatenate([v, np.zeros((size - n, *v.shape[1:]), v.dtype)])
            for k, v in batch.items()}
  padded['mask'] = (np.arange(size) < n).astype(np.float32)
  return padded
