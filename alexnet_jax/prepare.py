"""Every split of a dataset rescaled once, as the paper down-sampled ImageNet (Sec. 2), and
stored as a TFDS dataset that `--config.prepared=True` reads (`datasets.prepared_dir`).

python -m alexnet_jax.prepare --config=configs/imagenet.py --config.manual_dir=~/imagenet
python -m alexnet_jax.prepare --config=configs/imagenet.py --config.prepared_format=raw
"""

import dataclasses
import functools
import json
import os
import re
import shutil
import sys
import tarfile
import time
from collections.abc import Callable, Iterator

from absl import app
from absl import flags
from absl import logging
import filelock
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core import naming

from alexnet_jax import config_lib
from alexnet_jax import datasets
from alexnet_jax import files
from alexnet_jax import input_pipeline

# Source examples per shard, a shard being the unit of resuming: ~30 MB of 256² JPEGs
# at quality 95, ~200 MB of raw pixels. A rerun keeps the value its copy started with.
SHARD_EXAMPLES = 1024
# Seconds between progress lines.
PROGRESS_SECONDS = 30

# ImageNet's original files (ILSVRC 2012), as TFDS's imagenet2012 builder names them.
TRAIN_TAR = 'ILSVRC2012_img_train.tar'
VAL_TAR = 'ILSVRC2012_img_val.tar'
IMAGENET_FILES_HELP = (
  f'alexnet_jax.prepare reads ImageNet from its original tars {TRAIN_TAR} (1000 '
  f'synset tars n01440764.tar, ... of JPEGs) and {VAL_TAR} (ILSVRC2012_val_00000001.JPEG, '
  '...), from https://image-net.org/download-images; pass their folder as '
  '--config.manual_dir=DIR.'
)
# The validation images' synsets, line n for ILSVRC2012_val_<n>.JPEG, as shipped in the
# tensorflow_datasets package (imagenet_common._VALIDATION_LABELS_FNAME).
_VALIDATION_LABELS = 'datasets/imagenet2012/validation_labels.txt'
_VAL_NAME = re.compile(r'ILSVRC2012_val_(\d{8})\.JPEG')

# The train tar's images are written in a random order of this seed, as cuda-convnet2's
# make-data/make-data.py shuffled its list of train JPEGs (`shuffle(train_jpeg_files)`)
# before writing batches: the tar holds them synset by synset, and the reader's
# shuffle buffer (config.shuffle_buffer, 16,384 = 1.3% of 1,281,167) cannot mix
# classes that lie 1,300 images apart. A constant, not config.seed: one copy serves
# runs of every seed (benchmarks/class_mixing.py).
TRAIN_ORDER_SEED = 0

# Inside `<prepared_dir>.incomplete` while it is written: a shard's records and counts.
_WORK = 'work'
_PROGRESS = 'progress.json'


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of a source: its size, and its examples in the order the copy keeps."""

  name: str
  num_examples: int
  # examples(skip) -> (encoded image bytes, label, file name) of examples skip, skip + 1,
  # ...: the first `skip` are passed over without being decoded.
  examples: Callable[[int], Iterator[tuple[bytes, int, str]]]
  # That order, for the logs and the finished marker.
  order: str = 'as stored'


@dataclasses.dataclass(frozen=True)
class Source:
  """What `prepare` reads: a description for the logs, label names, splits."""

  description: str
  label_names: list[str]
  splits: list[Split]


# --------------------------------------------------------------------------------------
# Sources.


def source(config: ml_collections.ConfigDict) -> Source:
  """The examples of every split of `config.dataset`, images encoded.

  ImageNet ('imagenet2012'), unless TFDS's own copy is prepared in data_dir, is read
  from the original tars in manual_dir in one pass (`imagenet_tars`), with no full-size
  TFDS build first. Any other dataset is the builder `datasets.builder` gives with
  `config.prepared` False (Fashion-MNIST and CIFAR-10 from their files, an image folder,
  a prepared TFDS ImageNet, any TFDS dataset), every split in its stored order, which
  TFDS shuffled when it built the dataset (an image folder: its file list shuffled
  with the split's name as seed, `tfds.ImageFolder`).

  Raises:
    FileNotFoundError: if the source's files are missing.
    ValueError: if they are unreadable, or the dataset has no split.
  """
  if config.dataset == 'imagenet2012':
    tfds_imagenet = tfds.builder('imagenet2012', data_dir=config.data_dir)
    if not tfds_imagenet.is_prepared():  # Its label names need no data.
      return imagenet_tars(config.manual_dir, list(tfds_imagenet.info.features['label'].names))
  return _tfds_source(config)


def imagenet_tars(manual_dir: str | None, label_names: list[str]) -> Source:
  """ILSVRC 2012's 'train' and 'validation' splits, read from its tars in `manual_dir`.

  Train: `TRAIN_TAR` holds one tar per synset (`n01440764.tar`, ...) of its JPEGs;
  the label is the synset's index in `label_names` (TFDS's imagenet2012 label names,
  the sorted synsets). Its images are given in a random order, seeded by
  `TRAIN_ORDER_SEED`, each read at its offset in the tar: the archive holds them
  class by class, and a copy in that order would give batches of a few classes
  (`TRAIN_ORDER_SEED`). Validation: `VAL_TAR` holds `ILSVRC2012_val_<n>.JPEG`, whose
  synset is line n of TFDS's validation labels file (`_VALIDATION_LABELS`; by number,
  so that a tar holding only some of the 50,000 is labelled right too), in archive
  order. The sizes and offsets come from a pass over the tars' headers (seeking past
  the images), which also checks the layout before anything is written.

  Raises:
    FileNotFoundError: naming each missing tar and the folder.
    ValueError: for an unreadable tar, or a member that is not a synset tar (train)
      or an `ILSVRC2012_val_<n>.JPEG` with n in 1-50,000 (validation).
  """
  folder = os.path.expanduser(manual_dir or '')
  paths = {name: os.path.join(folder, name) for name in (TRAIN_TAR, VAL_TAR)}
  missing = [name for name, path in paths.items() if not os.path.isfile(path)]
  if missing:
    where = f'folder {folder}' if folder else 'folder None (config.manual_dir is not set)'
    raise FileNotFoundError(f'{" and ".join(missing)} not found in {where}. {IMAGENET_FILES_HELP}')
  label_of = {synset: label for label, synset in enumerate(label_names)}
  logging.info('Counting the images in %s and %s (headers only).', *paths.values())
  train = _synset_tars(paths[TRAIN_TAR], label_of)
  # Legacy RandomState: its stream is frozen across numpy versions, so a rerun after an
  # upgrade still resumes the same order.
  train_order = np.random.RandomState(TRAIN_ORDER_SEED).permutation(len(train.labels))
  with open(tfds.core.tfds_path(_VALIDATION_LABELS)) as f:
    val_synsets = f.read().split()
  val_labels = _val_labels(paths[VAL_TAR], val_synsets, label_of)
  return Source(
    description=f'ImageNet tars in {folder}',
    label_names=label_names,
    splits=[
      Split(
        'train',
        len(train.labels),
        functools.partial(_train_examples, paths[TRAIN_TAR], train, train_order),
        order=f'shuffled (seed {TRAIN_ORDER_SEED})',
      ),
      Split(
        'validation', len(val_labels), functools.partial(_val_examples, paths[VAL_TAR], val_labels)
      ),
    ],
  )


def _tar_error(path: str, e: Exception) -> ValueError:
  return ValueError(f'{path} is not a readable tar ({e}). {IMAGENET_FILES_HELP}')


@dataclasses.dataclass(frozen=True)
class _TarImages:
  """Where each image of the train tar lies: its bytes at `offsets[i]` (from the start of
  the outer tar file), `sizes[i]` long; its label and file name. In archive order."""

  offsets: np.ndarray  # int64 [N]
  sizes: np.ndarray  # int64 [N]
  labels: np.ndarray  # int64 [N]
  names: np.ndarray  # bytes [N]


def _synset_tars(path: str, label_of: dict[str, int]) -> _TarImages:
  """Every image of the train tar's synset tars, located (headers only: the inner tars
  are stored uncompressed, so an image's bytes lie at its inner offset past its
  synset tar's own)."""
  offsets, sizes, labels, names = [], [], [], []
  try:
    with tarfile.open(path, 'r:') as outer:
      for member in outer:
        if not member.isfile():
          continue
        synset = os.path.basename(member.name).removesuffix('.tar')
        if not member.name.endswith('.tar') or synset not in label_of:
          raise ValueError(
            f'{path} holds {member.name}, not one of the 1000 synset tars '
            f'(n01440764.tar, ...). {IMAGENET_FILES_HELP}'
          )
        with tarfile.open(fileobj=outer.extractfile(member), mode='r:') as inner:
          for image in inner:
            if image.isfile():
              offsets.append(member.offset_data + image.offset_data)
              sizes.append(image.size)
              labels.append(label_of[synset])
              names.append(os.path.basename(image.name).encode())
  except (tarfile.TarError, OSError, EOFError) as e:
    raise _tar_error(path, e) from e
  return _TarImages(
    np.array(offsets, np.int64),
    np.array(sizes, np.int64),
    np.array(labels, np.int64),
    np.array(names, object),
  )


def _val_labels(path: str, val_synsets: list[str], label_of: dict[str, int]) -> list[int]:
  """The label of each image of the validation tar, in archive order."""
  labels = []
  try:
    with tarfile.open(path, 'r:') as tar:
      for member in tar:
        if not member.isfile():
          continue
        match = _VAL_NAME.fullmatch(os.path.basename(member.name))
        if not match or not 1 <= int(match[1]) <= len(val_synsets):
          raise ValueError(
            f'{path} holds {member.name}, not an ILSVRC2012_val_<n>.JPEG with n in '
            f'1-{len(val_synsets)}. {IMAGENET_FILES_HELP}'
          )
        labels.append(label_of[val_synsets[int(match[1]) - 1]])
  except (tarfile.TarError, OSError, EOFError) as e:
    raise _tar_error(path, e) from e
  return labels


def _train_examples(
  path: str, images: _TarImages, order: np.ndarray, skip: int
) -> Iterator[tuple[bytes, int, str]]:
  """The train tar's images `order[skip]`, `order[skip + 1]`, ..., each read at its
  offset (as make-data.py read its shuffled list of tar members)."""
  try:
    with open(path, 'rb') as f:
      for i in order[skip:]:
        f.seek(images.offsets[i])
        data = f.read(images.sizes[i])
        if len(data) != images.sizes[i]:
          raise EOFError(f'{images.names[i].decode()} ends early')
        yield data, int(images.labels[i]), images.names[i].decode()
  except (OSError, EOFError) as e:
    raise _tar_error(path, e) from e


def _val_examples(path: str, labels: list[int], skip: int) -> Iterator[tuple[bytes, int, str]]:
  """The validation tar's images from number `skip` on."""
  try:
    with tarfile.open(path, 'r:') as tar:
      images = (member for member in tar if member.isfile())
      for index, member in enumerate(images):
        if index >= skip:
          yield tar.extractfile(member).read(), labels[index], os.path.basename(member.name)
  except (tarfile.TarError, OSError, EOFError) as e:
    raise _tar_error(path, e) from e


def _tfds_source(config: ml_collections.ConfigDict) -> Source:
  source_config = config.copy_and_resolve_references()
  source_config.prepared = False
  builder = datasets.builder(source_config)
  features = builder.info.features
  if 'image' not in features or not isinstance(
    features['label'] if 'label' in features else None, tfds.features.ClassLabel
  ):
    raise ValueError(
      f'{config.dataset} has no image and class label features (its features: '
      f'{", ".join(features)}): alexnet_jax.prepare stores (image, label) pairs.'
    )
  splits = [
    Split(
      name,
      info.num_examples,
      functools.partial(_tfds_examples, builder, name),
      order='as stored (TFDS shuffles when it builds)',
    )
    for name, info in builder.info.splits.items()
  ]
  if not splits:
    where = f' ({config.manual_dir})' if config.dataset == 'image_folder' else ''
    raise ValueError(f'{config.dataset}{where} holds no split of images.')
  return Source(
    description=f'{config.dataset} ({builder.data_dir})',
    label_names=list(features['label'].names),
    splits=splits,
  )


def _tfds_examples(
  builder: tfds.core.DatasetBuilder, split: str, skip: int
) -> Iterator[tuple[bytes, int, str]]:
  """`split` of `builder` in stored order (its files read one after the other) from
  example `skip` on: a sub-split, whose files before it are not read, except for an
  image folder, which has none (its images before it are read but not decoded)."""
  folder = input_pipeline.is_image_folder(builder)
  ds = builder.as_dataset(
    split=split if folder or not skip else f'{split}[{skip}:]',
    decoders={'image': tfds.decode.SkipDecoding()},
    read_config=tfds.ReadConfig(interleave_cycle_length=1),
  )
  if folder:
    ds = ds.skip(skip)
  for example in ds.as_numpy_iterator():
    name = example.get('file_name', example.get('image/filename', b''))
    yield example['image'], int(example['label']), name.decode(errors='replace')


# --------------------------------------------------------------------------------------
# Writing.


def features(
  config: ml_collections.ConfigDict, label_names: list[str]
) -> tfds.features.FeaturesDict:
  """The copy's features: 'image' uint8 [S, S, 3] (S = resize_size), stored as the
  JPEG bytes written (format 'jpeg') or as its S·S·3 bytes ('raw'), and 'label'."""
  shape = (config.resize_size, config.resize_size, 3)
  if config.prepared_format == 'jpeg':
    image = tfds.features.Image(shape=shape, encoding_format='jpeg')
  else:
    image = tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding=tfds.features.Encoding.BYTES)
  return tfds.features.FeaturesDict(
    {'image': image, 'label': tfds.features.ClassLabel(names=label_names)}
  )


def _stored(config: ml_collections.ConfigDict) -> Callable[..., tuple[tf.Tensor, ...]]:
  """(index, encoded, label) -> (index, what the copy stores of the image, label)."""

  def store(index, encoded, label):
    image = input_pipeline.stored_image(encoded, config)
    if config.prepared_format == 'jpeg':
      image = tf.io.encode_jpeg(image, quality=config.prepared_jpeg_quality)
    return index, image, label

  return store


class _Feed:
  """Examples `start`, `start + 1`, ... of a split as a tf.data source, each with its
  index. What the tf.data stream does not say (ignore_errors drops the undecodable),
  this does: how many examples it gave, their file names, and the source's own error."""

  def __init__(self, split: Split, start: int):
    self.split, self.start = split, start
    self.end = start  # One past the last example given.
    self.error = None
    self.names = {}  # Index -> file name, of the examples given and not yet seen.

  def __call__(self):
    try:
      for encoded, label, name in self.split.examples(self.start):
        self.names[self.end] = name
        self.end += 1
        yield self.end - 1, encoded, label
    except Exception as e:  # pylint: disable=broad-except
      self.error = e  # Raised by `_write_split` once the stream ends.

  def dataset(self, config: ml_collections.ConfigDict) -> tf.data.Dataset:
    """(index, stored image, label), in the order `split.examples` gives them;
    `input_pipeline.decode_threads()` images decoded and rescaled at once."""
    cores = input_pipeline.decode_threads()
    ds = tf.data.Dataset.from_generator(
      self,
      output_signature=(
        tf.TensorSpec((), tf.int64),
        tf.TensorSpec((), tf.string),
        tf.TensorSpec((), tf.int64),
      ),
    )
    ds = ds.map(
      input_pipeline.as_written(_stored(config)), num_parallel_calls=cores, deterministic=True
    )
    options = input_pipeline.data_options(threads=cores)
    return ds.ignore_errors().prefetch(2 * cores).with_options(options)


def _shard_path(work: str, split: str, shard: int, suffix: str) -> str:
  return os.path.join(work, f'{split}-{shard:05d}.{suffix}')


def _shard_counts(work: str, split: str, shard: int) -> dict | None:
  """A finished shard's counts; None if it is not finished."""
  path = _shard_path(work, split, shard, 'json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _fsync(path: str):
  """Flushes a file's data, or a folder's entries (a rename in it), to the disk: what a
  counts file or marker vouches for must outlive a power cut, not only a kill."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _commit_shard(work: str, split: str, shard: int, counts: dict):
  """Marks a shard finished: its records (if any) on disk under their name, then its
  counts."""
  temp = _shard_path(work, split, shard, 'tfrecord.tmp')
  if counts['examples']:
    _fsync(temp)
    os.replace(temp, _shard_path(work, split, shard, 'tfrecord'))
    _fsync(work)
  files.write_json(_shard_path(work, split, shard, 'json'), counts)
  _fsync(work)


def _remove_shards(work: str, split: str, shards: range):
  for shard in shards:
    for suffix in ('json', 'tfrecord', 'tfrecord.tmp'):
      path = _shard_path(work, split, shard, suffix)
      if os.path.exists(path):
        os.remove(path)


class _Progress:
  """Logs done/total, img/s and an ETA every `PROGRESS_SECONDS`."""

  def __init__(self, split: str, start: int, total: int):
    self.split, self.start, self.total = split, start, total
    self.began = self.last = time.monotonic()

  def line(self, done: int, skipped: int) -> str:
    elapsed = max(time.monotonic() - self.began, 1e-9)
    rate = (done - self.start) / elapsed
    eta = (self.total - done) / rate if rate > 0 else float('inf')
    eta = time.strftime('%H:%M:%S', time.gmtime(eta)) if eta < 86400 * 365 else '?'
    return (
      f'{self.split}: {done}/{self.total} ({100 * done / self.total:.1f}%), {rate:.0f} img/s, '
      f'ETA {eta}, {skipped} undecodable skipped'
    )

  def maybe_log(self, done: int, skipped: int):
    if time.monotonic() - self.last >= PROGRESS_SECONDS:
      self.last = time.monotonic()
      logging.info('%s', self.line(done, skipped))


def _write_split(
  split: Split,
  config: ml_collections.ConfigDict,
  feature_dict: tfds.features.FeaturesDict,
  work: str,
  shard_examples: int,
) -> list[dict]:
  """Writes the shards of `split` not yet finished; returns every shard's counts.

  Shard k holds the decodable examples of source examples [k·n, (k+1)·n), n =
  `shard_examples`, written to a temporary file, renamed when complete, then marked
  finished by its counts file (`_commit_shard`). A rerun starts at the first shard
  not finished, skipping (not decoding) the source examples before it.

  Raises:
    ValueError: if no example of the split decodes (its shards are then removed, so
      that a rerun reads it again), or the source gives another number of examples
      than its size, or fails while read.
  """
  total = split.num_examples
  if total == 0:
    raise ValueError(f'Split {split.name!r} holds no example.')
  num_shards = -(-total // shard_examples)
  size = lambda shard: min(shard_examples, total - shard * shard_examples)  # Source examples.
  counts = [_shard_counts(work, split.name, k) for k in range(num_shards)]
  first = next((k for k, c in enumerate(counts) if c is None), num_shards)
  if first < num_shards:
    _remove_shards(work, split.name, range(first, num_shards))
    start = first * shard_examples
    if first:
      logging.info(
        '%s: shards 0-%d of %d were written before; resuming at example %d.',
        split.name,
        first - 1,
        num_shards,
        start,
      )
    counts[first:] = _stream_shards(split, config, feature_dict, work, first, shard_examples, size)
  written = sum(c['examples'] for c in counts)
  skipped = sum(c['skipped'] for c in counts)
  if not written:
    _remove_shards(work, split.name, range(num_shards))
    raise ValueError(
      f'No image of split {split.name!r} decodes ({skipped} of {total} tried): are these '
      'image files (JPEG, PNG, GIF, BMP)?'
    )
  return counts


def _stream_shards(
  split: Split,
  config: ml_collections.ConfigDict,
  feature_dict: tfds.features.FeaturesDict,
  work: str,
  first: int,
  shard_examples: int,
  size: Callable[[int], int],
) -> list[dict]:
  """Shards `first`, ... of `split`, written from one tf.data stream (`_write_split`);
  `size(shard)` is the number of source examples in a shard.

  Raises:
    ValueError: if a shard's written + skipped examples are not its source examples,
      or the source fails or ends early.
  """
  total = split.num_examples
  num_shards = -(-total // shard_examples)
  feed = _Feed(split, first * shard_examples)
  progress = _Progress(split.name, feed.start, total)
  done = []  # Counts of the shards this call finished.
  shard, writer = first, None
  written = num_bytes = skipped = 0
  skipped_total = 0
  next_index = feed.start  # The index the stream gives next, if it decodes.

  def finish_shard():
    nonlocal shard, writer, written, num_bytes, skipped
    if writer is not None:
      writer.close()
    counts = {'examples': written, 'skipped': skipped, 'bytes': num_bytes}
    if written + skipped != size(shard):
      raise ValueError(
        f'{split.name} shard {shard}: {written} written + {skipped} skipped examples, '
        f'but the source holds {size(shard)} there.'
      )
    _commit_shard(work, split.name, shard, counts)
    done.append(counts)
    shard, writer = shard + 1, None
    written = num_bytes = skipped = 0

  def skip_to(index):
    """Counts the examples before `index` that the stream left out."""
    nonlocal next_index, skipped, skipped_total
    for lost in range(next_index, index):
      while lost >= (shard + 1) * shard_examples:
        finish_shard()
      logging.warning(
        '%s example %d (%s) does not decode: skipped.', split.name, lost, feed.names.pop(lost, '')
      )
      skipped += 1
      skipped_total += 1
    next_index = max(next_index, index)

  for index, image, label in feed.dataset(config).as_numpy_iterator():
    if index >= total:  # Before a shard past the split's size is committed as finished.
      raise ValueError(f'{split.name}: the source gives more than its {total} examples.')
    skip_to(index)
    feed.names.pop(index, None)
    while index >= (shard + 1) * shard_examples:
      finish_shard()
    if writer is None:
      writer = tf.io.TFRecordWriter(_shard_path(work, split.name, shard, 'tfrecord.tmp'))
    record = feature_dict.serialize_example({'image': image, 'label': int(label)})
    writer.write(record)
    written += 1
    num_bytes += len(record)
    next_index = index + 1
    progress.maybe_log(next_index, skipped_total)
  if feed.error is not None:
    raise ValueError(f'{split.name}: reading the source failed: {feed.error}') from feed.error
  skip_to(feed.end)
  if feed.end != total:
    raise ValueError(f'{split.name}: the source gave {feed.end} examples, but its size is {total}.')
  while shard < num_shards:
    finish_shard()
  logging.info('%s', progress.line(total, skipped_total))
  return done


def _start_work(work: str, src: Source, shard_examples: int) -> int:
  """The shard size of the copy being written in `work`: recorded by its first run,
  checked against `src` on reruns.

  Raises:
    ValueError: if the copy in progress was started from another source.
  """
  path = os.path.join(work, _PROGRESS)
  record = {
    'source': src.description,
    'splits': {split.name: split.num_examples for split in src.splits},
    'num_classes': len(src.label_names),
    'shard_examples': shard_examples,
    'orders': {split.name: split.order for split in src.splits},
  }
  if not os.path.exists(path):
    os.makedirs(work, exist_ok=True)
    files.write_json(path, record)
    return shard_examples
  with open(path) as f:
    started = json.load(f)
  if any(started.get(key) != record[key] for key in ('splits', 'num_classes', 'orders')):
    raise ValueError(
      f'{os.path.dirname(work)} holds a copy in progress of another source ({started}; '
      f'now {record}): delete that folder to start again.'
    )
  return started['shard_examples']


def _file_prefix(config: ml_collections.ConfigDict) -> str:
  """The dataset name in the shard file names (TFDS's `[a-zA-Z]\\w*`)."""
  name = re.sub(r'\W', '_', datasets.prepared_name(config))
  return name if name[:1].isalpha() else f'd{name}'


def _finish(
  config: ml_collections.ConfigDict,
  src: Source,
  feature_dict: tfds.features.FeaturesDict,
  incomplete: str,
  counts: dict[str, list[dict]],
) -> dict:
  """Names the shards as TFDS does, writes TFDS's metadata, reads the copy back and
  writes the finished marker; returns the summary the marker holds."""
  work = os.path.join(incomplete, _WORK)
  template = naming.ShardedFileTemplate(
    data_dir=incomplete,
    template=naming.DEFAULT_FILENAME_TEMPLATE,
    dataset_name=_file_prefix(config),
    filetype_suffix='tfrecord',
  )
  split_infos, summary = [], {}
  for split in src.splits:
    kept = [k for k, c in enumerate(counts[split.name]) if c['examples']]  # Empty: left out.
    for index, shard in enumerate(kept):
      source_path = _shard_path(work, split.name, shard, 'tfrecord')
      target = os.fspath(
        template.replace(split=split.name).sharded_filepath(shard_index=index, num_shards=len(kept))
      )
      if os.path.exists(source_path):
        os.replace(source_path, target)
      elif not os.path.exists(target):
        raise ValueError(f'{source_path} is missing: delete {incomplete} to start again.')
    shard_counts = [counts[split.name][k] for k in kept]
    split_infos.append(
      tfds.core.SplitInfo(
        name=split.name,
        shard_lengths=[c['examples'] for c in shard_counts],
        num_bytes=sum(c['bytes'] for c in shard_counts),
      )
    )
    summary[split.name] = {
      'examples': sum(c['examples'] for c in shard_counts),
      'skipped': sum(c['skipped'] for c in counts[split.name]),
      'shards': len(kept),
      'order': split.order,
    }
  keys = {k: config[k] for k in ('resize', 'resize_size', 'image_size', 'prepared_format')}
  if config.prepared_format == 'jpeg':
    keys['prepared_jpeg_quality'] = config.prepared_jpeg_quality
  tfds.folder_dataset.write_metadata(
    data_dir=incomplete,
    features=feature_dict,
    split_infos=split_infos,
    filename_template=template,
    check_data=False,  # `_check_reads` reads more.
    description=(
      f'{src.description}, rescaled once by alexnet_jax.prepare (Krizhevsky et al. 2012, '
      f'Sec. 2): {json.dumps(keys)}.'
    ),
    supervised_keys=('image', 'label'),
  )
  _fsync(incomplete)  # The shards' new names, and TFDS's metadata.
  _check_reads(incomplete, summary, config, counts)
  marker = {'source': src.description, 'config': keys, 'splits': summary}
  files.write_json(os.path.join(incomplete, datasets.PREPARED_MARKER), marker)
  _fsync(incomplete)
  return marker


def _check_reads(
  directory: str, summary: dict, config: ml_collections.ConfigDict, counts: dict[str, list[dict]]
):
  """Reads the copy back: every record of every shard, counted against the examples
  written there from the source (`counts`, per split and shard: written + skipped
  were the source's examples), then the first and last example of every split
  through TFDS.

  Raises:
    ValueError: naming a shard with a corrupt or truncated record or another number of
      records, or if a split's size or an image's shape is not what was written.
  """
  builder = tfds.builder_from_directory(directory)
  shape = (config.resize_size, config.resize_size, 3)
  for split, split_counts in summary.items():
    info = builder.info.splits[split]
    try:
      input_pipeline.check_records(
        [os.fspath(p) for p in info.filepaths],
        [c['examples'] for c in counts[split] if c['examples']],
      )
    except ValueError as e:
      raise ValueError(f'{directory} reads back wrong: {e} Delete it to start again.') from e
    examples = [
      *builder.as_dataset(split=f'{split}[:1]'),
      *builder.as_dataset(split=f'{split}[-1:]'),
    ]
    if info.num_examples != split_counts['examples'] or any(
      tuple(e['image'].shape) != shape for e in examples
    ):
      raise ValueError(
        f'{directory} reads back wrong: {split} has {info.num_examples} examples (written: '
        f'{split_counts["examples"]}), images {[tuple(e["image"].shape) for e in examples]}.'
      )


def _size_on_disk(directory: str) -> int:
  return sum(
    os.path.getsize(os.path.join(root, name))
    for root, _, names in os.walk(directory)
    for name in names
  )


def _refuse_finished(directory: str):
  """Raises FileExistsError if `directory` exists, saying whether it is a finished copy
  (it holds `datasets.PREPARED_MARKER`)."""
  if os.path.exists(directory):
    state = (
      'a finished copy'
      if os.path.exists(os.path.join(directory, datasets.PREPARED_MARKER))
      else 'not a finished copy'
    )
    raise FileExistsError(
      f'{directory} already exists ({state}); it is never overwritten: delete it to '
      'prepare it again.'
    )


def prepare(config: ml_collections.ConfigDict) -> str:
  """Writes every split of `config.dataset`, rescaled, as a TFDS dataset; once.

  Each image is `input_pipeline.stored_image` of its source bytes (`config.resize` to
  uint8 [S, S, 3], S = resize_size: the paper's shorter side to 256 and central patch,
  Sec. 2), stored as a JPEG of quality `config.prepared_jpeg_quality` (95:
  cuda-convnet2's make-data/pyext/include/pyext.h:26) or as raw pixels
  (`config.prepared_format`), with its label, in the order `source` gives: ImageNet's
  train images in a seeded random order (`TRAIN_ORDER_SEED`), every other split as
  stored. Images are decoded `input_pipeline.decode_threads()` at a time by tf.data.
  Undecodable images are skipped, counted and named in the log.

  The copy is written in `<prepared_dir>.incomplete` in shards of `SHARD_EXAMPLES`
  source examples; a rerun after a kill goes on from the first shard not finished.
  When every split is written, the shards get TFDS's names, TFDS's metadata is
  written (`tfds.folder_dataset.write_metadata`), the copy is read back (every record of
  every shard counted against the source; each shard was fsynced when finished), the
  finished marker (`datasets.PREPARED_MARKER`, its counts) is written and the folder renamed
  to `datasets.prepared_dir(config)`, which `tfds.builder_from_directory` reads.

  One process only: a multi-process job is refused (the work does not split over
  processes). A second run on the same copy at once is refused (a file lock).

  Returns:
    The copy's folder, `datasets.prepared_dir(config)`.

  Raises:
    FileExistsError: if that folder exists: a finished copy is never overwritten.
    FileNotFoundError: if the source's files are missing (for ImageNet, naming each
      missing tar and the folder).
    ValueError: for unreadable sources, a split where no image decodes, a count of
      examples written + skipped that differs from the source's, several processes,
      or another run writing the same copy.
  """
  if jax.process_count() > 1:
    raise ValueError(
      f'alexnet_jax.prepare runs as one process; this job has {jax.process_count()}.'
    )
  directory = datasets.prepared_dir(config)
  _refuse_finished(directory)
  src = source(config)
  incomplete = directory + '.incomplete'
  os.makedirs(os.path.dirname(directory), exist_ok=True)
  # Refused, not waited for (as `checkpoints.workdir_lock`; `datasets._preparing` waits):
  # a second writer of this copy would write the same shards again.
  lock = filelock.FileLock(directory + '.lock')
  try:
    lock.acquire(blocking=False)
  except filelock.Timeout as e:
    raise ValueError(
      f'Another alexnet_jax.prepare is writing {directory} (lock {lock.lock_file}).'
    ) from e
  try:
    _refuse_finished(directory)  # Written by the lock's last holder.
    if not os.path.exists(os.path.join(incomplete, datasets.PREPARED_MARKER)):
      work = os.path.join(incomplete, _WORK)
      shard_examples = _start_work(work, src, SHARD_EXAMPLES)
      feature_dict = features(config, src.label_names)
      logging.info(
        'Preparing %s from %s: %s; %d-example shards, %d images decoded at once.',
        directory,
        src.description,
        ', '.join(f'{s.name} {s.num_examples}' for s in src.splits),
        shard_examples,
        input_pipeline.decode_threads(),
      )
      counts = {
        split.name: _write_split(split, config, feature_dict, work, shard_examples)
        for split in src.splits
      }
      _finish(config, src, feature_dict, incomplete, counts)
    shutil.rmtree(os.path.join(incomplete, _WORK), ignore_errors=True)
    os.replace(incomplete, directory)
    _fsync(os.path.dirname(directory))
  finally:
    lock.release()
  with open(os.path.join(directory, datasets.PREPARED_MARKER)) as f:
    summary = json.load(f)['splits']
  size = _size_on_disk(directory)
  logging.info(
    'Prepared %s: %s on disk; %s.',
    directory,
    f'{size / 2**30:.2f} GiB' if size >= 2**30 else f'{size / 2**20:.1f} MiB',
    '; '.join(
      f'{name} {c["examples"]} images in {c["shards"]} shards, {c["skipped"]} undecodable skipped'
      for name, c in summary.items()
    ),
  )
  return directory


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  jax.config.update('jax_platforms', 'cpu')  # No accelerator needed, nor its memory taken.
  tf.config.experimental.set_visible_devices([], 'GPU')
  config = flags.FLAGS.config
  try:  # What the user must fix (a config value, a missing or bad file) in one line.
    config_lib.validate(config)
    directory = prepare(config)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    sys.exit(f'{type(e).__name__}: {e}')
  print(
    f'Wrote {directory}; train on it with --config.prepared=True {datasets.prepare_flags(config)}'
  )


if __name__ == '__main__':
  config_flags.DEFINE_config_file(
    'config',
    'configs/imagenet.py',
    'The training config whose dataset, resize, resize_size and prepared_* keys to use.',
    lock_config=True,
  )
  app.run(main)
