"""tf.data input: the paper's augmentation (Sec. 4.1), train batches in an order fixed by
(seed, step), padded evaluation batches; each process reads its part of the data.

The host decodes and crops (of a prepared copy, only the crop window) and draws each
example's flip and lighting; batches cross to the device as uint8 pixels, where the
jitted step applies the draws and normalises (`augment.model_input`): 1/4 of float32's
bytes, and the per-pixel float work off the host. Random draws are stateless, seeded
by (config.seed, example position), so a resumed run sees exactly the batches an
uninterrupted one would.
"""

import dataclasses
import functools
import itertools
import os
import socket
from collections.abc import Callable, Iterator

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from alexnet_jax import config_lib
from alexnet_jax import datasets
from alexnet_jax import sharding

# Sec. 4.1 PCA ("fancy PCA") lighting: eigen-decomposition of the ImageNet RGB pixel
# covariance, as published with fb.resnet.torch (pixels scaled to [0, 1]).
IMAGENET_EIGVALS = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVECS = (
  (-0.5675, 0.7192, 0.4009),
  (-0.5808, -0.0045, -0.8140),
  (-0.5836, -0.6948, 0.4203),
)

# tf.data traces this module's functions as they are written: they branch on tensors with
# tf.cond, never with Python control flow, so AutoGraph's source conversion is skipped
# (it cost ~1 s of CPU at the first trace of every process).
as_written = tf.autograph.experimental.do_not_convert

# --------------------------------------------------------------------------------------
# Augmentation (per example, [H, W, 3] in 0-255: float32 while rescaled, uint8 crops).


def resize_shorter_side(image: tf.Tensor, size: int) -> tf.Tensor:
  """Bilinear resize so the shorter side is `size` pixels (Sec. 2: 256 for ImageNet)."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = size / tf.reduce_min(shape)
  new_shape = tf.cast(tf.round(shape * scale), tf.int32)
  return tf.image.resize(image, tf.maximum(new_shape, size), antialias=True)


def rescale(image: tf.Tensor, config: ml_collections.ConfigDict) -> tf.Tensor:
  """The `resize_size`² image that crops are taken from, float32 `[S, S, 3]`.

  `config.resize` 'shorter_side' is the paper's (Sec. 2): shorter side to 256, then
  the central 256×256 patch. 'square' warps the whole image to 256×256 with plain
  bilinear interpolation, as Caffe's ImageNet data were made (convert_imageset
  --resize_height=256 --resize_width=256, OpenCV INTER_LINEAR). 'pad' warps it to
  `image_size`² and pads it with black (0) to `resize_size`², so that a random crop is
  a random translation and the central crop the whole image (for small images that
  fill their frame, e.g. Fashion-MNIST's).
  """
  if config.resize == 'square':
    size = (config.resize_size, config.resize_size)
    return tf.image.resize(image, size, method='bilinear', antialias=False)
  if config.resize == 'pad':
    image = tf.image.resize(image, (config.image_size, config.image_size), antialias=True)
    border = config.resize_size - config.image_size
    return tf.pad(image, [(border // 2, border - border // 2)] * 2 + [(0, 0)])
  return central_crop(resize_shorter_side(image, config.resize_size), config.resize_size)


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
  return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)


def stored_image(encoded: tf.Tensor, config: ml_collections.ConfigDict) -> tf.Tensor:
  """The `rescale`d image as uint8 `[S, S, 3]` (S = resize_size), rounded: what crops
  are cut from, and what `alexnet_jax.prepare` stores once per image.

  Raises (inside tf.data): InvalidArgumentError for undecodable bytes.
  """
  return _to_uint8(rescale(decode(encoded), config))


def central_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """The central `size`×`size` patch."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  top, left = (h - size) // 2, (w - size) // 2
  return image[top : top + size, left : left + size]


def ten_crops(image: tf.Tensor, size: int) -> tf.Tensor:
  """The paper's test patches (Sec. 4.1), `[10, size, size, 3]` from `[H, W, 3]` (any dtype).

  In order: top-left, top-right, bottom-left, bottom-right and central patch, then
  the same five reflected horizontally.
  """
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  corners = [
    image[:size, :size],
    image[:size, w - size :],
    image[h - size :, :size],
    image[h - size :, w - size :],
  ]
  patches = tf.stack([*corners, central_crop(image, size)])
  return tf.concat([patches, tf.reverse(patches, axis=[2])], axis=0)


def crop_window(shape, size: int, seed: tf.Tensor) -> tf.Tensor:
  """[top, left] int32 of a uniformly placed `size`×`size` window of an image of
  `shape` [H, W, 3] (Sec. 4.1: 224×224 of 256×256).

  The offsets `tf.image.stateless_random_crop` draws for that shape and seed, so that
  decoding only the window (`tf.image.decode_and_crop_jpeg`) takes the same pixels
  as cropping the decoded image.
  """
  limit = tf.stack([shape[0] - size + 1, shape[1] - size + 1, 1])
  offset = tf.random.stateless_uniform([3], seed=seed, maxval=tf.int32.max, dtype=tf.int32)
  return (offset % limit)[:2]


def flip_draw(seed: tf.Tensor) -> tf.Tensor:
  """Whether to reflect the image horizontally, with probability 1/2 (Sec. 4.1): bool
  []; `tf.image.stateless_random_flip_left_right`'s draw for the seed."""
  return tf.random.stateless_uniform([], seed=seed, minval=0.0, maxval=1.0) < 0.5


def lighting_offset(stddev: float, seed: tf.Tensor) -> tf.Tensor:
  """The PCA lighting offset V · (α ∘ λ), float32 [3] in 0-255 RGB units, α ~ N(0,
  stddev) (Sec. 4.1: 0.1), added to every pixel of the image.

  λ, V: `IMAGENET_EIGVALS` (scaled to 0-255 here) and `IMAGENET_EIGVECS` (columns).
  """
  alpha = tf.random.stateless_normal([3], seed=seed, stddev=stddev)
  eigvals = tf.constant(IMAGENET_EIGVALS) * 255.0
  return tf.linalg.matvec(tf.constant(IMAGENET_EIGVECS), alpha * eigvals)


def _inception_window(shape: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """(top-left [2], size [2]) of a random-resized crop's window in `shape` [H, W, 3]."""
  top_left, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
    shape,
    tf.zeros([1, 0, 4]),
    seed=seed,
    min_object_covered=0.0,
    aspect_ratio_range=(3 / 4, 4 / 3),
    area_range=(0.08, 1.0),
    max_attempts=10,
    use_image_if_no_bounding_boxes=True,
  )
  return top_left[:2], crop_size[:2]


def inception_crop(encoded: tf.Tensor, size: int, seed: tf.Tensor) -> tf.Tensor:
  """Random-resized crop (Szegedy et al. 2015): 8-100% of the area, aspect 3/4-4/3,
  resized to `size`², float32 `[size, size, 3]`.

  Not the paper's augmentation; torchvision's AlexNet recipe uses it, the original
  (and Caffe's bvlc_alexnet) use a random window of the 256² image. `encoded` is
  image bytes (JPEGs are decoded only inside the window) or uint8 pixels [H, W, 3].
  """
  if encoded.dtype == tf.uint8:
    image = _slice_window(encoded, *_inception_window(tf.shape(encoded), seed))
  else:
    is_jpeg = tf.io.is_jpeg(encoded)
    shape = tf.cond(
      is_jpeg,
      lambda: tf.io.extract_jpeg_shape(encoded),
      lambda: tf.shape(_decode_uint8(encoded)),
    )
    top_left, crop_size = _inception_window(shape, seed)
    image = tf.cond(
      is_jpeg,
      lambda: _decode_jpeg_window(encoded, tf.concat([top_left, crop_size], 0)),
      lambda: _slice_window(_decode_uint8(encoded), top_left, crop_size),
    )
  return tf.image.resize(tf.cast(image, tf.float32), (size, size), antialias=True)


def _slice_window(image: tf.Tensor, top_left: tf.Tensor, crop_size: tf.Tensor) -> tf.Tensor:
  """The `crop_size` [2] window of `image` [H, W, 3] at `top_left` [2]."""
  return tf.slice(image, tf.concat([top_left, [0]], 0), tf.concat([crop_size, [3]], 0))


# libjpeg's accurate integer IDCT (its JDCT_ISLOW, what Pillow and OpenCV decode with),
# not TF's default fast one, which costs ~0.8 dB PSNR on quality-95 copies.
_DCT_METHOD = 'INTEGER_ACCURATE'


def _decode_uint8(encoded: tf.Tensor) -> tf.Tensor:
  """JPEG/PNG/GIF/BMP bytes → uint8 [H, W, 3] (JPEGs with `_DCT_METHOD`)."""
  return tf.cond(
    tf.io.is_jpeg(encoded),
    lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method=_DCT_METHOD),
    lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False),
  )


def _decode_jpeg_window(encoded: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
  """The [top, left, height, width] `window` of a JPEG, uint8, only it decoded."""
  return tf.image.decode_and_crop_jpeg(encoded, window, channels=3, dct_method=_DCT_METHOD)


def decode(encoded: tf.Tensor) -> tf.Tensor:
  """PNG/JPEG bytes → float32 [H, W, 3]; grayscale is replicated to RGB; JPEGs with
  libjpeg's accurate IDCT (`_DCT_METHOD`).

  Raises (inside tf.data): InvalidArgumentError for undecodable bytes.
  """
  return tf.cast(_decode_uint8(encoded), tf.float32)


def _rescaled(encoded: tf.Tensor, config: ml_collections.ConfigDict) -> tf.Tensor:
  """The uint8 `[S, S, 3]` image crops are cut from: `stored_image` of an original, or
  a prepared copy's image (JPEG bytes, or raw pixels) decoded as it is."""
  if not config.prepared:
    return stored_image(encoded, config)
  if config.prepared_format == 'raw':
    return encoded
  return tf.io.decode_jpeg(encoded, channels=3, dct_method=_DCT_METHOD)


def _prepared_jpeg(config: ml_collections.ConfigDict) -> bool:
  """Whether the images read are a prepared copy's JPEGs of `resize_size`²."""
  return config.prepared and config.prepared_format == 'jpeg'


def paper_crop(encoded: tf.Tensor, seed: tf.Tensor, config: ml_collections.ConfigDict) -> tf.Tensor:
  """A `crop_window` of the `_rescaled` image, uint8 `[s, s, 3]` (s = image_size).

  Of a prepared JPEG only that window is decoded; its pixels are the full decode's,
  but for the last column of a 4:2:0 JPEG (libjpeg upsamples chroma from the right
  neighbour, which the window lacks): within a few levels there.
  """
  size = config.image_size
  if _prepared_jpeg(config):
    stored = (config.resize_size, config.resize_size, 3)
    top, left = tf.unstack(crop_window(stored, size, seed))
    return _decode_jpeg_window(encoded, tf.stack([top, left, size, size]))
  image = _rescaled(encoded, config)
  top, left = tf.unstack(crop_window(tf.shape(image), size, seed))
  return image[top : top + size, left : left + size]


def preprocess_train(encoded, seed, config: ml_collections.ConfigDict) -> dict[str, tf.Tensor]:
  """One train example's crop and its draws of the augmentation; `seed` int [2].

  The crop (`config.augment.crop`) is made here; the per-pixel work is left to the
  device (`augment.model_input`, in the jitted step): 'image' uint8 `[s, s, 3]`,
  'flip' bool [] (`flip_draw`; False without `augment.flip`) and 'lighting' float32
  [3] (`lighting_offset`; 0 without PCA lighting). Applied in that order and then
  normalised, they give the paper's crop → flip → lighting → mean subtraction.

  Raises (inside tf.data): InvalidArgumentError for undecodable bytes.
  """
  crop_seed, flip_seed, light_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  if config.augment.crop == 'inception':
    image = _to_uint8(inception_crop(encoded, config.image_size, crop_seed))
  elif config.augment.crop == 'paper':
    image = paper_crop(encoded, crop_seed, config)
  else:
    raise ValueError(f"Unknown augment.crop {config.augment.crop!r}: use 'paper' or 'inception'.")
  stddev = config.augment.pca_lighting_stddev
  return {
    'image': image,
    'flip': flip_draw(flip_seed) if config.augment.flip else tf.constant(False),
    'lighting': lighting_offset(stddev, light_seed) if stddev > 0 else tf.zeros([3]),
  }


def preprocess_eval(encoded, config: ml_collections.ConfigDict, crops: int = 1) -> tf.Tensor:
  """The test view, uint8 `[S, S, 3]` or `[crops, S, S, 3]`; normalised on the device
  (`augment.model_input`).

  1 crop is the central patch of the `rescale`d image; 10 are its `ten_crops`, as
  the paper tests (Sec. 4.1); 2 are the central patch and its reflection, the same
  test where the rescaled image is the patch itself (resize_size = image_size, where
  the 10 crops hold 5 copies of each). Of a prepared JPEG, 1 or 2 crops decode only
  the central window (its last column as `paper_crop` says).

  Raises:
    ValueError: if `crops` is not 1, 2 or 10.
  """
  if crops not in (1, 2, 10):
    raise ValueError(
      f'crops={crops}: use 1 (central patch), 2 (and its reflection) or 10 (Sec. 4.1).'
    )
  size = config.image_size
  if crops == 10:
    return ten_crops(_rescaled(encoded, config), size)
  if _prepared_jpeg(config):  # Only the central window decoded (see `paper_crop`).
    offset = (config.resize_size - size) // 2
    image = _decode_jpeg_window(encoded, tf.constant([offset, offset, size, size]))
  else:
    image = central_crop(_rescaled(encoded, config), size)
  if crops == 2:
    image = tf.stack([image, tf.reverse(image, axis=[1])])
  return image


# --------------------------------------------------------------------------------------
# Batches.


def _decoders(builder: tfds.core.DatasetBuilder) -> dict | None:
  """Images stay encoded until `preprocess_*` (a prepared copy's raw pixels, a
  `tfds.features.Tensor`, are read as uint8 [S, S, 3])."""
  if isinstance(builder.info.features['image'], tfds.features.Image):
    return {'image': tfds.decode.SkipDecoding()}
  return None


def _num_examples(builder: tfds.core.DatasetBuilder, split: str) -> int:
  return int(builder.as_dataset(split=split, decoders=_decoders(builder)).cardinality())


def data_options(deterministic: bool = True, threads: int | None = None) -> tf.data.Options:
  """The tf.data options of every stream of the data path (train and test batches,
  label counts, `alexnet_jax.prepare`): elements in order if `deterministic`, and a
  private pool of `threads` threads when given.

  Autotuning is off: its thread sleeps in periods that double up to 60 s, and an
  iterator's destructor waits for it (the end of a 30-min run hung ~50 s on a slowly
  read stream, benchmarks/README.md). AUTOTUNE then keeps TF's starting value, min(16,
  cores) parallel calls: the decodes get `decode_threads()` calls instead.
  """
  options = tf.data.Options()
  options.deterministic = deterministic
  options.autotune.enabled = False
  if threads is not None:
    options.threading.private_threadpool_size = threads
  return options


def is_image_folder(builder: tfds.core.DatasetBuilder) -> bool:
  """Whether `builder` reads image files one by one (`tfds.ImageFolder`), the data
  path's one special case: it has no sub-splits (`split[a:b]`; `_read_part`'s part p
  then holds the split's examples p, p + parts, ..., not a consecutive range), no
  record files to check, and an unseeded file shuffle (its stored order is a seeded
  shuffle already)."""
  return isinstance(builder, tfds.ImageFolder)


def _read_part(
  builder: tfds.core.DatasetBuilder,
  split: str,
  part: int,
  num_parts: int,
  read_config: tfds.ReadConfig | None = None,
) -> tf.data.Dataset:
  """Part `part` of `num_parts` of `split` (all of it for one part), images encoded.

  With `read_config.shuffle_seed` set, the part's files are read in the order that
  seed gives (TFDS's `shuffle_files`; an image folder, whose own file shuffle is not
  seeded, in its stored order).
  """
  decoders = _decoders(builder)
  shuffle_files = read_config is not None and read_config.shuffle_seed is not None
  if is_image_folder(builder):
    ds = builder.as_dataset(split=split, decoders=decoders)
    return ds if num_parts == 1 else ds.shard(num_parts, part)
  if num_parts > 1:
    split = tfds.even_splits(split, num_parts)[part]
  return builder.as_dataset(
    split=split, decoders=decoders, read_config=read_config, shuffle_files=shuffle_files
  )


# Train files read at once: TFDS's default interleave_cycle_length.
_FILES_AT_ONCE = 16


def _train_read_config(per_class: int | None, seed: tf.Tensor | None = None) -> tfds.ReadConfig:
  """How the train split's files are read.

  With `train_examples_per_class` (`per_class`), one file after the other in stored
  order ("the first N" must not depend on the reading). Otherwise interleaved one
  example at a time (block length 1, from `_FILES_AT_ONCE` files), in the order of
  `seed` when given (a tensor: a new order every epoch): a split stored in class
  order (ImageNet's tars; a copy TFDS did not shuffle) then reaches the shuffle
  buffer as a mix of 16 files, not runs of 16 examples of one.
  """
  if per_class is not None:
    return tfds.ReadConfig(interleave_cycle_length=1)
  return tfds.ReadConfig(
    interleave_cycle_length=_FILES_AT_ONCE,
    interleave_block_length=1,
    shuffle_seed=seed,
    shuffle_reshuffle_each_iteration=False,
    # A dataset its builder stores in order (`disable_shuffling`) is mixed for training
    # too: TFDS would refuse shuffle_files there, and read one file at a time.
    enable_ordering_guard=False,
  )


def _part_labels(
  builder: tfds.core.DatasetBuilder,
  split: str,
  num_parts: int,
  read_config: tfds.ReadConfig | None,
) -> list[np.ndarray]:
  """The labels of every part of `split`, int64, in the order `_read_part` streams them.

  Images are read (an image folder's files, a TFRecord's bytes) but not decoded.
  """
  options = data_options()
  labels = []
  for part in range(num_parts):
    ds = _read_part(builder, split, part, num_parts, read_config).map(
      as_written(lambda ex: ex['label'])
    )
    batches = ds.batch(8192).with_options(options).as_numpy_iterator()
    labels.append(np.concatenate([np.zeros(0, np.int64), *batches]))
  return labels


def _kept_per_class(
  part_labels: list[np.ndarray],
  new_ids: np.ndarray,
  per_class: int | None,
  interleaved: bool,
) -> np.ndarray:
  """How many examples of each class every part keeps, int [parts, dataset classes].

  Kept: those of the classes with `new_ids[label] >= 0`, and with `per_class`, only
  the first `per_class` of each class in the split's stored order (which the parts
  hold consecutively, or interleaved: `is_image_folder`). As each part streams its
  examples in stored order, a part's kept examples of a class are then its first
  ones of that class, however the split is cut into parts.
  """
  num_parts = len(part_labels)
  sizes = [len(labels) for labels in part_labels]
  if interleaved:
    positions = [np.arange(size) * num_parts + part for part, size in enumerate(sizes)]
  else:
    starts = np.cumsum([0, *sizes[:-1]])
    positions = [start + np.arange(size) for start, size in zip(starts, sizes, strict=True)]
  stored = np.empty(sum(sizes), np.int64)
  for where, labels in zip(positions, part_labels, strict=True):
    stored[where] = labels
  kept = new_ids[stored] >= 0
  if per_class is not None:
    # Each example's index among the examples of its class, in stored order.
    order = np.argsort(stored, kind='stable')
    by_class = stored[order]
    index_in_class = np.empty(len(stored), np.int64)
    index_in_class[order] = np.arange(len(stored)) - np.searchsorted(by_class, by_class)
    kept &= index_in_class < per_class
  return np.stack(
    [
      np.bincount(labels[kept[where]], minlength=len(new_ids))
      for where, labels in zip(positions, part_labels, strict=True)
    ]
  )


def _select(
  ds: tf.data.Dataset, new_ids: np.ndarray, quota: np.ndarray | None = None
) -> tf.data.Dataset:
  """The examples of `ds` whose class has `new_ids[label] >= 0`, labelled `new_ids[label]`.

  With `quota` (int [dataset classes]), only the first `quota[label]` of each class,
  counted by a scan over the stream; its reading ends once every quota is met.
  """
  new_ids = tf.constant(new_ids, tf.int64)
  if quota is None:
    ds = ds.filter(as_written(lambda ex: tf.gather(new_ids, ex['label']) >= 0))
  else:
    quota = tf.constant(quota, tf.int64)

    @as_written
    def count(seen, ex):
      label = ex['label']
      done = tf.reduce_all(seen >= quota)  # Before this example: it is not needed.
      keep = seen[label] < quota[label]
      return tf.tensor_scatter_nd_add(seen, [[label]], [1]), (ex, keep, done)

    ds = ds.scan(tf.zeros_like(quota), count)
    ds = ds.take_while(as_written(lambda ex, keep, done: tf.logical_not(done)))
    ds = ds.filter(as_written(lambda ex, keep, done: keep))
    ds = ds.map(as_written(lambda ex, keep, done: ex))
  return ds.map(as_written(lambda ex: {**ex, 'label': tf.gather(new_ids, ex['label'])}))


@dataclasses.dataclass(frozen=True)
class Datasets:
  """Sizes and batch iterators of one dataset's train and test splits.

  Batches hold this part's rows of every global batch (all rows for one part), as
  numpy: 'image' uint8 [B, S, S, 3], 'label' int32 [B]; train batches also carry
  'flip' bool [B] and 'lighting' float32 [B, 3] (`preprocess_train`), test batches
  'mask' [B] (0 on padding), and `test_batches(crops=10)` gives 'image'
  [B, 10, S, S, 3] (`ten_crops`).
  """

  # After `config.classes` and `config.train_examples_per_class`.
  num_train_examples: int  # Of the whole split, over all parts.
  num_test_examples: int  # Of the whole split.
  # Global batches per epoch: num_train_examples // batch_size (with a subset: what
  # the part with the fewest examples fills).
  steps_per_epoch: int
  num_test_batches: int  # What `test_batches` yields, the same for every part.
  train_batches: Callable[..., Iterator[dict[str, np.ndarray]]]
  test_batches: Callable[..., Iterator[dict[str, np.ndarray]]]


def create_datasets(
  config: ml_collections.ConfigDict, part: int = 0, num_parts: int = 1
) -> Datasets:
  """Prepares `config.dataset` if needed and returns its input pipelines.

  The data are read in `num_parts` disjoint parts, one per group of processes that
  feed the same rows (`sharding.data_groups`); each part makes 1/num_parts of every
  global batch of `config.batch_size` / `config.eval_batch_size` examples.

  Train order: epoch e is the part's examples shuffled with a seed from
  (config.seed, e) (a `shuffle_buffer`-sized window, as tf.data shuffles), cut to
  steps_per_epoch batches. A run resumed at step s builds epoch s // steps_per_epoch
  directly and skips, still encoded, only the examples of that epoch before s: the
  cost of a resume is bounded by one epoch whatever the step (a skip through every
  earlier epoch would read the data once per epoch done), while the order stays a
  function of (seed, step) alone. Augmentation is seeded by (config.seed, position
  in the stream, part).

  Subsets: `config.classes` (dataset label ids) keeps only their examples in both
  splits, relabelled 0..k-1 in that order; `config.train_examples_per_class` = N keeps
  the first N of each class of the train split in its stored order (its files then
  read one at a time, not interleaved; `_kept_per_class`), and a test split that is
  the train split (`features --probe`, a top-1 on the train split) reads those too.
  Either one reads every label of the split(s) concerned once, here, to count what is
  kept (images read but not decoded); the selection is made on the encoded stream, before each epoch's
  shuffle, so that every epoch reshuffles the same examples.

  Raises:
    FileNotFoundError: if the dataset's source files are missing.
    ValueError: if the dataset's class count differs from `config.num_classes`.
    config_lib.ConfigError: if an id of `config.classes` is not one of the dataset's.
  """
  builder = datasets.builder(config)
  reader = _Reader(builder, config, _new_ids(builder, config), part, num_parts)
  train = _train_split(reader)
  test = _test_split(reader, train)
  steps_per_epoch = _steps_per_epoch(reader, train)
  threads = decode_threads()
  options = data_options(config.deterministic_input, threads)
  return Datasets(
    num_train_examples=train.total,
    num_test_examples=test.total,
    steps_per_epoch=steps_per_epoch,
    num_test_batches=test.batches_of_largest_part(reader.eval_rows, num_parts),
    train_batches=functools.partial(
      _train_batches, reader, train, steps_per_epoch, threads, options
    ),
    test_batches=functools.partial(_test_batches, reader, test, threads, options),
  )


@dataclasses.dataclass(frozen=True)
class _Reader:
  """What reads this part of a dataset: its builder, the config, the relabelling
  `new_ids` (int [dataset classes]: dataset label id -> ours, -1: dropped) and this
  part's place among the parts."""

  builder: tfds.core.DatasetBuilder
  config: ml_collections.ConfigDict
  new_ids: np.ndarray
  part: int
  num_parts: int

  @property
  def rows(self) -> int:
    """This part's rows of a global train batch."""
    return self.config.batch_size // self.num_parts

  @property
  def eval_rows(self) -> int:
    """This part's rows of a global test batch."""
    return self.config.eval_batch_size // self.num_parts

  def read(self, split: str, read_config: tfds.ReadConfig | None = None) -> tf.data.Dataset:
    """This part of `split`, images encoded (`_read_part`)."""
    return _read_part(self.builder, split, self.part, self.num_parts, read_config)

  def kept_per_part(
    self, split: str, read_config: tfds.ReadConfig | None, per_class: int | None
  ) -> np.ndarray:
    """`_kept_per_class` of `split`, read with `read_config`: int [parts, classes]."""
    return _kept_per_class(
      _part_labels(self.builder, split, self.num_parts, read_config),
      self.new_ids,
      per_class,
      is_image_folder(self.builder),
    )


@dataclasses.dataclass(frozen=True)
class _Split:
  """One split as this part reads it: `examples`, encoded and selected; `total`, the
  examples of all parts; `part_sizes` (int [parts]), each part's, where a subset was
  counted (None: the whole split, in even parts)."""

  examples: tf.data.Dataset
  total: int
  part_sizes: np.ndarray | None = None

  def size(self, part: int) -> int:
    """The examples of part `part` (this part's, as `examples` holds it)."""
    if self.part_sizes is None:
      return int(self.examples.cardinality())
    return int(self.part_sizes[part])

  def batches_of_largest_part(self, rows: int, num_parts: int) -> int:
    """Batches of `rows` that the largest part fills, its last one padded: every part
    runs that many (no process may wait for another in a collective), the smaller ones
    ending with all-padding batches."""
    if self.part_sizes is None:
      return _ceil_div(_ceil_div(self.total, num_parts), rows)
    return _ceil_div(int(self.part_sizes.max()), rows)


def _new_ids(builder: tfds.core.DatasetBuilder, config: ml_collections.ConfigDict) -> np.ndarray:
  """Dataset label id -> ours, int [dataset classes] (-1: dropped by `config.classes`).

  Raises:
    ValueError: if the dataset's class count differs from `config.num_classes`.
    config_lib.ConfigError: if an id of `config.classes` is not one of the dataset's.
  """
  num_classes = builder.info.features['label'].num_classes
  classes = tuple(config.classes)
  if not classes:
    if num_classes != config.num_classes:
      raise ValueError(
        f'{config.dataset} has {num_classes} classes but config.num_classes='
        f'{config.num_classes}; set --config.num_classes={num_classes}.'
      )
    return np.arange(num_classes)
  bad = [c for c in classes if not 0 <= c < num_classes]
  if bad:
    raise config_lib.ConfigError(
      f'config.classes={classes} holds id {bad[0]}, but {config.dataset} has '
      f'{num_classes} classes (ids 0-{num_classes - 1}).'
    )
  new_ids = np.full(num_classes, -1)
  new_ids[list(classes)] = np.arange(len(classes))
  return new_ids


def _train_split(reader: _Reader) -> _Split:
  """This part's train examples in stored order, after `config.classes` and
  `config.train_examples_per_class` (counted in every part: `_kept_per_class`)."""
  config = reader.config
  per_class = config.train_examples_per_class
  read_config = _train_read_config(per_class)
  train = reader.read(config.train_split, read_config)
  if not config.classes and per_class is None:
    return _Split(train, _num_examples(reader.builder, config.train_split))
  kept = reader.kept_per_part(config.train_split, read_config, per_class)
  quota = None if per_class is None else kept[reader.part]
  part_sizes = kept.sum(axis=1)
  return _Split(_select(train, reader.new_ids, quota), int(part_sizes.sum()), part_sizes)


def _test_split(reader: _Reader, train: _Split) -> _Split:
  """This part's test examples, after `config.classes`; with
  `config.train_examples_per_class` and the train split as test split, the examples
  trained on (features of the train split, its top-1), not the split."""
  config = reader.config
  if config.train_examples_per_class is not None and config.test_split == config.train_split:
    return train
  test = reader.read(config.test_split)
  if not config.classes:
    return _Split(test, _num_examples(reader.builder, config.test_split))
  part_sizes = reader.kept_per_part(config.test_split, None, None).sum(axis=1)
  return _Split(_select(test, reader.new_ids), int(part_sizes.sum()), part_sizes)


def _steps_per_epoch(reader: _Reader, train: _Split) -> int:
  """Global train batches per epoch.

  Parts may keep different numbers of examples: every part (every process) runs the
  same steps per epoch, those its smallest one fills, so that none waits for another
  in a collective; a larger part leaves a few examples out of each epoch (other ones
  each epoch, as its shuffle differs).
  """
  config = reader.config
  if train.part_sizes is None:
    return train.total // config.batch_size
  steps_per_epoch = int(min(train.part_sizes // reader.rows))
  logging.info(
    '%s %s subset: %d examples (per part: %s), %d steps per epoch.',
    config.dataset,
    config.train_split,
    train.total,
    train.part_sizes.tolist(),
    steps_per_epoch,
  )
  return steps_per_epoch


def _check_train_batch(reader: _Reader, train: _Split, steps_per_epoch: int):
  """Raises ValueError if a part holds fewer examples than its rows of one batch."""
  config = reader.config
  if steps_per_epoch == 0 and train.part_sizes is not None:
    raise ValueError(
      f'{config.dataset} {config.train_split}: a part of the subset (per part: '
      f'{train.part_sizes.tolist()} examples) holds fewer than its {reader.rows} rows of '
      f'config.batch_size={config.batch_size}.'
    )
  if steps_per_epoch == 0:
    raise ValueError(
      f'{config.dataset} {config.train_split} has {train.total} examples, '
      f'fewer than config.batch_size={config.batch_size}.'
    )


def _train_epochs(
  reader: _Reader, train: _Split, steps_per_epoch: int, start_step: int
) -> tf.data.Dataset:
  """Endless (index in the stream, (encoded image, label)) pairs from step `start_step`
  on: each epoch's examples shuffled by (config.seed, epoch), steps_per_epoch batches
  of them."""
  config = reader.config
  pairs = lambda ds: ds.map(as_written(lambda ex: (ex['image'], ex['label'])))
  source = pairs(train.examples)
  if config.cache:
    source = source.cache()
  # Files in a new order every epoch, unless the stream is cached (read once, in
  # stored order) or must keep its stored order (`per_class`).
  per_class = config.train_examples_per_class
  shuffle_files = not config.cache and per_class is None

  @as_written
  def epoch(index):
    # A distinct shuffle seed for every (config.seed < 1_000_003, epoch) pair.
    seed = tf.cast(index, tf.int64) * 1_000_003 + config.seed
    ds = source
    if shuffle_files:
      ds = reader.read(config.train_split, _train_read_config(per_class, seed))
      ds = pairs(_select(ds, reader.new_ids) if config.classes else ds)
    return ds.shuffle(config.shuffle_buffer, seed=seed).take(steps_per_epoch * reader.rows)

  first_epoch, step_in_epoch = divmod(start_step, steps_per_epoch)
  ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch)
  return ds.skip(step_in_epoch * reader.rows).enumerate(start=start_step * reader.rows)


def _train_batches(
  reader: _Reader,
  train: _Split,
  steps_per_epoch: int,
  threads: int,
  options: tf.data.Options,
  start_step: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
  """Endless batches from step `start_step` on; the same for a given config.seed.

  Raises:
    ValueError: if the split holds fewer examples than one batch.
  """
  config, rows = reader.config, reader.rows
  _check_train_batch(reader, train, steps_per_epoch)
  with sharding.failures_agreed():  # One process's part may be the bad one.
    _check_decodes(train.examples, config)

  def preprocess(index, example):
    encoded, label = example
    seed = tf.stack([tf.constant(config.seed, tf.int64), index * reader.num_parts + reader.part])
    return {
      **preprocess_train(encoded, seed, config),
      'label': tf.cast(label, tf.int32),
      'index': index,
    }

  ds = _map_decodable(
    _train_epochs(reader, train, steps_per_epoch, start_step), preprocess, threads
  )
  ds = ds.batch(rows, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  batches = _skip_counted(ds.with_options(options).as_numpy_iterator(), start_step * rows, 'train')
  return _naming_damaged_files(batches, reader.builder, config.train_split)


def _test_batches(
  reader: _Reader, test: _Split, threads: int, options: tf.data.Options, crops: int = 1
) -> Iterator[dict[str, np.ndarray]]:
  """Every decodable test example of the part once, in order, in `num_test_batches`
  batches, padded and masked."""
  config, eval_rows = reader.config, reader.eval_rows
  ds = _map_decodable(
    test.examples.enumerate(),
    lambda index, ex: {
      'image': preprocess_eval(ex['image'], config, crops),
      'label': tf.cast(ex['label'], tf.int32),
      'index': index,
    },
    threads,
  )
  ds = ds.batch(eval_rows).prefetch(tf.data.AUTOTUNE)
  batches = _skip_counted(
    ds.with_options(options).as_numpy_iterator(), 0, 'test', total=test.size(reader.part)
  )
  batches = _naming_damaged_files(batches, reader.builder, config.test_split)
  image_shape = (config.image_size, config.image_size, 3)
  if crops != 1:
    image_shape = (crops, *image_shape)
  empty = {'image': np.zeros((0, *image_shape), np.uint8), 'label': np.zeros((0,), np.int32)}
  num_batches = test.batches_of_largest_part(eval_rows, reader.num_parts)
  for _, batch in itertools.zip_longest(range(num_batches), batches, fillvalue=empty):
    yield pad_batch(batch, eval_rows)


# The fixed sizes of what `decode_threads` gathers from every process (an all-gather
# needs one shape on all): a host name (Linux's HOST_NAME_MAX is 64; POSIX allows 255)
# and an affinity mask of Linux's largest CPU count (CONFIG_NR_CPUS ≤ 8192).
_HOST_NAME_BYTES = 255
_MAX_CPUS = 8192


def decode_threads() -> int:
  """Parallel decodes for this process (≥ 1): its share of the cores it may use.

  The cores are those of its affinity mask (`os.sched_getaffinity`: SLURM's
  --cpus-per-task binding, taskset), no more than its cgroup's CPU quota allows
  (`cgroup_cpu_limit`), divided evenly among the processes of this job that share
  them (`_sharers`: on the same host, by name, with overlapping affinity masks). The
  quota is taken as shared by those processes too, as by a container's or a job's
  cgroup that holds them all.

  In a multi-process job this is a collective (every process calls it): each
  all-gathers its host name and affinity mask, uint8 [_HOST_NAME_BYTES + _MAX_CPUS / 8].
  """
  cores = os.sched_getaffinity(0)
  limit = cgroup_cpu_limit()
  available = len(cores) if limit is None else min(len(cores), limit)
  sharers = 1
  if jax.process_count() > 1:
    host = socket.gethostname().encode()[:_HOST_NAME_BYTES].ljust(_HOST_NAME_BYTES, b'\0')
    mask = np.zeros(_MAX_CPUS, bool)
    mask[list(cores)] = True
    mine = np.concatenate([np.frombuffer(host, np.uint8), np.packbits(mask)])
    gathered = multihost_utils.process_allgather(mine)
    hosts = [row[:_HOST_NAME_BYTES].tobytes() for row in gathered]
    masks = np.unpackbits(gathered[:, _HOST_NAME_BYTES:], axis=1).astype(bool)
    sharers = _sharers(jax.process_index(), hosts, masks)
  threads = max(1, available // sharers)
  logging.info(
    'Decode threads: %d (%d core(s) in the affinity mask, cgroup CPU limit %s, shared '
    'by %d process(es) of this job on host %s).',
    threads,
    len(cores),
    limit,
    sharers,
    socket.gethostname(),
  )
  return threads


def _sharers(me: int, hosts: list[bytes], masks: np.ndarray) -> int:
  """How many processes (`me` among them) share process `me`'s cores: those with its
  host name whose affinity mask (bool [processes, CPUs]) overlaps its own."""
  return sum(
    host == hosts[me] and bool(np.any(mask & masks[me]))
    for host, mask in zip(hosts, masks, strict=True)
  )


def cgroup_cpu_limit(
  proc_cgroup: str = '/proc/self/cgroup', root: str = '/sys/fs/cgroup'
) -> int | None:
  """Whole cores the cgroup v2 CPU quota allows (≥ 1), None without a quota.

  The smallest quota of the process's cgroup (`proc_cgroup`'s '0::/PATH' line, under
  `root`) and its ancestors, from each one's `cpu.max` ('QUOTA PERIOD' in µs: QUOTA /
  PERIOD cores, rounded down; 'max PERIOD': none). None also without cgroup v2
  (no such line, or no `cpu.max` files: e.g. cgroup v1).
  """
  with open(proc_cgroup) as f:
    paths = [line[3:].strip() for line in f if line.startswith('0::')]
  if not paths:
    return None
  parts = paths[0].split('/')[1:] if paths[0] != '/' else []
  if '..' in parts:  # A cgroup outside this namespace's view: only the root's is seen.
    parts = []
  limits = []
  for depth in range(len(parts) + 1):
    try:
      with open(os.path.join(root, *parts[:depth], 'cpu.max')) as f:
        quota, period = f.read().split()
    except FileNotFoundError:
      continue
    if quota != 'max':
      limits.append(max(1, int(quota) // int(period)))
  return min(limits, default=None)


# How many of a train split's first examples `_check_decodes` tries before it gives up.
_DECODE_PROBE = 1000


def _check_decodes(train: tf.data.Dataset, config: ml_collections.ConfigDict):
  """Raises ValueError unless one of the split's first `_DECODE_PROBE` images decodes.

  Undecodable images are skipped in the endless train stream (`ignore_errors`), so
  one that holds none would never yield a batch (an image folder of text files
  named .jpg ran for 10 min at full CPU); this costs one decode on a sound split.
  """
  seed = tf.zeros([2], tf.int64)
  probe = (
    train.take(_DECODE_PROBE)
    .map(as_written(lambda ex: preprocess_train(ex['image'], seed, config)['image']))
    .ignore_errors()
    .take(1)
  )
  if not list(probe.as_numpy_iterator()):
    raise ValueError(
      f'None of the first {_DECODE_PROBE} images of {config.dataset} {config.train_split} '
      f'decodes as a PNG/JPEG/GIF/BMP image (config.manual_dir={config.manual_dir!r}, '
      f'data_dir={config.data_dir!r}); check the files, or prepare the dataset again.'
    )


# Elements `_map_decodable` maps in one dataset of their own: its creation (~0.5 ms of
# CPU) is shared by them.
_DECODE_CHUNK = 64


def _map_decodable(ds: tf.data.Dataset, fn: Callable, threads: int) -> tf.data.Dataset:
  """`ds.map(fn)` in order, `threads` calls at once, without the elements where `fn`
  raises (an undecodable image); an error of `ds` itself (a corrupt or truncated record,
  a file shorter than its metadata says) still stops the stream.

  `ignore_errors` after the map would swallow those too, and a truncated file would
  silently shorten every epoch: chunks of `_DECODE_CHUNK` elements are mapped in
  datasets of their own, whose errors alone are ignored, `threads` chunks at once.
  """
  return ds.batch(_DECODE_CHUNK).interleave(
    as_written(lambda *chunk: tf.data.Dataset.from_tensor_slices(chunk).map(fn).ignore_errors()),
    cycle_length=threads,
    block_length=_DECODE_CHUNK,
    num_parallel_calls=threads,
  )


def check_records(paths: list[str], lengths: list[int]):
  """Reads every record of each TFRecord file of `paths`, checking its CRCs, and
  counts them against `lengths` (int, one per file).

  Raises:
    ValueError: naming the first file with a corrupt or truncated record, or another
      number of records.
  """
  for path, length in zip(paths, lengths, strict=True):
    try:
      records = tf.data.TFRecordDataset(path)
      count = int(records.reduce(np.int64(0), as_written(lambda n, _: n + 1)))
    except tf.errors.OpError as e:
      raise ValueError(f'{path} is damaged ({e.message.splitlines()[0]}).') from e
    if count != length:
      raise ValueError(f'{path} holds {count} records, not {length}.')


def _naming_damaged_files(
  batches: Iterator[dict[str, np.ndarray]], builder: tfds.core.DatasetBuilder, split: str
) -> Iterator[dict[str, np.ndarray]]:
  """`batches`; where the stream fails, the file of `split` that is not whole is named.

  Raises:
    ValueError: naming the damaged file (`check_records`) and what to do.
    tf.errors.OpError: the stream's own error where every file is whole.
  """
  try:
    yield from batches
  except tf.errors.OpError as error:
    if not is_image_folder(builder):  # An image folder has no record files.
      info = builder.info.splits[split]
      try:
        check_records([os.fspath(p) for p in info.filepaths], info.shard_lengths)
      except ValueError as e:
        raise ValueError(
          f'Reading split {split!r} of {builder.data_dir} failed: {e} Delete that folder '
          'and prepare it again.'
        ) from error
    raise


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)


def _skip_counted(
  batches: Iterator[dict[str, np.ndarray]], first_index: int, split: str, total: int | None = None
) -> Iterator[dict[str, np.ndarray]]:
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
  """Pads every array to `size` rows with zeros and adds 'mask' float32 [size] (1 = real
  example); a batch of `size` rows keeps its arrays, uncopied."""
  n = len(batch['label'])
  mask = (np.arange(size) < n).astype(np.float32)
  if n == size:
    return {**batch, 'mask': mask}
  padded = {
    k: np.concatenate([v, np.zeros((size - n, *v.shape[1:]), v.dtype)]) for k, v in batch.items()
  }
  return {**padded, 'mask': mask}
