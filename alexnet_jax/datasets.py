"""Datasets on disk: TFDS builders prepared from the user's local files, class names.

Nothing here downloads at run time when the original files are given: Fashion-MNIST's
IDX files and CIFAR-10's binary archive are placed in TFDS's download cache; ImageNet
is built from its tars. With `config.prepared`, the builder is instead the rescaled
copy that `python -m alexnet_jax.prepare` wrote once (`prepared_dir`).
"""

from collections.abc import Callable
import contextlib
import json
import os
import shutil
import tarfile
import zlib

from absl import logging
import filelock
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import resource as tfds_resource

from alexnet_jax import sharding

FASHION_MNIST_FILES_HELP = (
  'Fashion-MNIST is read from its original IDX files (train-images-idx3-ubyte.gz, '
  'train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz). '
  'On Debian/Ubuntu: `sudo apt-get install dataset-fashion-mnist` puts them in '
  '/usr/share/datasets/fashion-mnist; elsewhere download them from '
  'https://github.com/zalandoresearch/fashion-mnist and pass '
  '--config.manual_dir=DIR.'
)


def _place_in_download_cache(
  builder: tfds.core.DatasetBuilder, manual_dir: str, files_help: str
) -> str:
  """Copies `builder`'s source files from `manual_dir` into its download cache.

  Each file goes to `<data_dir>/downloads/<get_dl_fname(url, registered sha256)>` with
  the `.INFO` record TFDS writes after a download. TFDS trusts a cached file under
  that name without hashing it, so `download_and_prepare` then reads the user's file
  offline even where it differs byte-wise from the registered one (re-gzipped,
  repacked, or a test's small archive); callers check the decoded data instead.

  Args:
    builder: a TFDS builder with registered checksums (`builder.url_infos`).
    manual_dir: folder holding each source under TFDS's file name for it
      (`url_checksums/<dataset>.txt`, e.g. `cifar-10-binary.tar.gz`).
    files_help: appended to the error: which files, and where to get them.

  Returns:
    The download directory to pass to `download_and_prepare(download_dir=...)`.

  Raises:
    FileNotFoundError: naming the first missing file, then `files_help`.
  """
  manual_dir = os.path.expanduser(manual_dir)
  download_dir = os.path.join(builder.data_dir_root, 'downloads')
  os.makedirs(download_dir, exist_ok=True)
  for url, info in builder.url_infos.items():
    source = os.path.join(manual_dir, info.filename)
    if not os.path.exists(source):
      raise FileNotFoundError(f'{source} not found. {files_help}')
    target = os.path.join(download_dir, tfds_resource.get_dl_fname(url, info.checksum))
    shutil.copyfile(source, target)
    with open(target + '.INFO', 'w') as f:
      json.dump({'urls': [url], 'original_fname': info.filename}, f)
  return download_dir


# Seconds between the log lines of a job waiting for another job's preparation.
_LOCK_LOG_SECONDS = 300


@contextlib.contextmanager
def _preparing(builder: tfds.core.DatasetBuilder):
  """Holds `<data_dir>/<dataset>.lock` (an OS file lock) while the caller prepares.

  Separate jobs (sweep points run in parallel, SLURM array tasks) on one data_dir
  would otherwise build the same dataset at once, in the same download cache and
  TFDS's same temporary directory: one fails or reads a half-written file. The lock
  is `flock`'s, so it is released when its holder exits, however it exits.

  The wait has no time limit, as a preparation legitimately takes hours (ImageNet's);
  it ends when the holder finishes or dies, and a log line every `_LOCK_LOG_SECONDS`
  names the lock waited for.

  This lock waits; the data path's other two refuse at once (`prepare.prepare`'s on a
  copy being written, `checkpoints.workdir_lock`'s on a workdir): a job here needs what
  the holder makes and then reuses it, while a second writer of one copy or one
  workdir has nothing to wait for (it would write the same files again).
  """
  root = os.fspath(builder.data_dir_root)
  if '://' in root:  # A bucket (gs://...) has no file locks: TFDS alone, as before.
    yield
    return
  os.makedirs(root, exist_ok=True)
  path = os.path.join(root, f'{builder.name}.lock')
  lock = filelock.FileLock(path)
  try:
    lock.acquire(blocking=False)
  except filelock.Timeout:
    logging.info('Waiting for another job preparing %s (lock %s).', builder.name, path)
    waited = 0
    while True:
      try:
        lock.acquire(timeout=_LOCK_LOG_SECONDS)
        break
      except filelock.Timeout:
        waited += _LOCK_LOG_SECONDS
        logging.info(
          'Still waiting (%d s) for another job preparing %s (lock %s).',
          waited,
          builder.name,
          path,
        )
  try:
    yield
  finally:
    lock.release()


# Written into the prepared dataset's folder once its data passed the check: the
# finished mark of data TFDS built in its own folders (`PREPARED_MARKER` is that of
# `alexnet_jax.prepare`'s copies, and holds their counts).
_CHECKED = 'alexnet_jax_checked'
# For `build`'s download_and_prepare: reuse the download cache (where the user's files
# were placed) but regenerate data that is already there, which never passed the check.
_REBUILD = tfds.download.DownloadConfig(
  download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
)


def _prepare_checked(
  name: str, data_dir: str | None, build: Callable[[tfds.core.DatasetBuilder], None]
) -> tfds.core.DatasetBuilder:
  """TFDS dataset `name`, prepared and checked by `build(builder)` unless it was before.

  TFDS counts a dataset as prepared as soon as `download_and_prepare` ends, before
  our check of the decoded data: data that failed the check, or whose job was killed
  during it, would be trained on by the next run. So only data holding the
  `_CHECKED` file, written once the check passed, count here (a crash at any point
  leaves none); other data are rebuilt by `build` (`_REBUILD`), after it placed the
  source files, and deleted when it raises. The data are built where TFDS reads
  them: no copy of a large dataset. `build` runs under `_preparing`'s lock, and a job
  that waited for it reuses what the holder prepared and checked.

  Raises:
    Whatever `build` raises, once the data it built are deleted.
  """
  builder = tfds.builder(name, data_dir=data_dir)
  if os.path.exists(os.path.join(builder.data_dir, _CHECKED)):
    return builder
  with _preparing(builder):
    # Another job may have prepared it while this one waited for the lock.
    builder = tfds.builder(name, data_dir=data_dir)
    if os.path.exists(os.path.join(builder.data_dir, _CHECKED)):
      return builder
    if builder.is_prepared():
      logging.warning('%s never passed its check: rebuilding it.', builder.data_dir)
    try:
      build(builder)
    except BaseException:
      shutil.rmtree(builder.data_dir, ignore_errors=True)
      raise
    with open(os.path.join(builder.data_dir, _CHECKED), 'w') as f:
      f.write("The data here passed alexnet_jax.datasets' check.\n")
  # Read back from disk: the builder made before a rebuild describes the old data.
  return tfds.builder(name, data_dir=data_dir)


def prepare_fashion_mnist(data_dir: str | None, manual_dir: str) -> tfds.core.DatasetBuilder:
  """Builds TFDS `fashion_mnist` from local IDX files, without network access.

  TFDS's registered checksums do not match Debian's re-gzipped files, so the files
  are placed in the builder's download cache (`_place_in_download_cache`) and the
  decoded data is checked instead.

  Raises:
    FileNotFoundError: if a file is missing from `manual_dir`.
    ValueError: if the prepared data are not Fashion-MNIST's 60,000 + 10,000
      28×28×1 uint8 images with labels 0-9 (they are then deleted).
  """

  def build(builder):
    download_dir = _place_in_download_cache(builder, manual_dir, FASHION_MNIST_FILES_HELP)
    builder.download_and_prepare(download_dir=download_dir, download_config=_REBUILD)
    _check_fashion_mnist(builder)

  return _prepare_checked('fashion_mnist', data_dir, build)


def _check_fashion_mnist(builder: tfds.core.DatasetBuilder):
  for split, expected in (('train', 60_000), ('test', 10_000)):
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    images, labels = data['image'], data['label']
    if (
      images.shape != (expected, 28, 28, 1)
      or images.dtype != np.uint8
      or set(np.unique(labels)) != set(range(10))
    ):
      raise ValueError(
        f'Prepared fashion_mnist {split} split is wrong: images {images.shape} '
        f'{images.dtype}, labels {sorted(set(np.unique(labels)))}; deleted '
        f'{builder.data_dir}. Check the source files. {FASHION_MNIST_FILES_HELP}'
      )


CIFAR10_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz'
CIFAR10_ARCHIVE = 'cifar-10-binary.tar.gz'
CIFAR10_FILES_HELP = (
  f'CIFAR-10 is read from its original binary archive {CIFAR10_ARCHIVE} '
  f'(cifar-10-batches-bin/data_batch_1.bin ... data_batch_5.bin, test_batch.bin, '
  f'batches.meta.txt): download it from {CIFAR10_URL}, put it in a folder DIR and '
  f'pass --config.manual_dir=DIR (or leave manual_dir unset to let TFDS download it).'
)
# The archive's layout, as TFDS's cifar10 builder reads it (image_classification/cifar.py).
_CIFAR10_FOLDER = 'cifar-10-batches-bin'
_CIFAR10_BATCHES = {
  'train': tuple(f'data_batch_{i}.bin' for i in range(1, 6)),
  'test': ('test_batch.bin',),
}
# 1 label byte + 32×32 red, then green, then blue bytes (row-major).
_CIFAR10_RECORD_BYTES = 1 + 32 * 32 * 3


def prepare_cifar10(data_dir: str | None, manual_dir: str) -> tfds.core.DatasetBuilder:
  """Builds TFDS `cifar10` from the original `cifar-10-binary.tar.gz`, without network.

  The archive is placed in the builder's download cache (`_place_in_download_cache`),
  so TFDS extracts and reads it as if it had downloaded it from `CIFAR10_URL`; class
  names come from its `batches.meta.txt`. Its checksum is not compared with TFDS's;
  the prepared data are checked against the archive's records instead.

  Args:
    data_dir: TFDS data directory (None: TFDS's default, ~/tensorflow_datasets).
    manual_dir: folder holding `cifar-10-binary.tar.gz`; unused once prepared.

  Returns:
    The prepared builder: 'train' and 'test' splits of 'image' uint8 [32, 32, 3],
    'label' int64 in 0-9 and 'id' ('train_00000', ...: record order in the archive).

  Raises:
    FileNotFoundError: if `manual_dir` has no `cifar-10-binary.tar.gz`.
    ValueError: if the archive is not a readable .tar.gz holding the six batches of
      3,073-byte records, or if the prepared splits do not hold exactly its records
      as 32×32×3 uint8 images with labels 0-9 (50,000 + 10,000 in the real archive;
      they are then deleted).
  """

  def build(builder):
    download_dir = _place_in_download_cache(builder, manual_dir, CIFAR10_FILES_HELP)
    archive = os.path.join(os.path.expanduser(manual_dir), CIFAR10_ARCHIVE)
    # Before TFDS extracts it: a bad archive then leaves no extraction behind.
    expected = _cifar10_record_counts(archive)
    # TFDS reuses an extraction whatever the archive now holds (one that failed the
    # check, or was replaced since): each build extracts afresh, and a failed one
    # leaves none.
    [(url, info)] = builder.url_infos.items()
    extraction = _extraction(download_dir, url, info)
    shutil.rmtree(extraction, ignore_errors=True)
    try:
      builder.download_and_prepare(download_dir=download_dir, download_config=_REBUILD)
      _check_cifar10(builder, expected, archive)
    except BaseException:
      shutil.rmtree(extraction, ignore_errors=True)
      raise

  return _prepare_checked('cifar10', data_dir, build)


def _extraction(download_dir: str, url: str, info) -> str:
  """Where TFDS extracts a cached download (`DownloadManager._extract`'s name)."""
  name = tfds_resource.get_dl_fname(url, info.checksum)
  method = tfds_resource.guess_extract_method(info.filename)
  return os.path.join(download_dir, 'extracted', f'{method.name}.{name}')


def _cifar10_record_counts(archive: str) -> dict[str, int]:
  """Records per split in the archive's batch files, from their sizes in the tar headers.

  Raises:
    ValueError: if the archive cannot be read, or a batch file (or batches.meta.txt)
      is missing or not a whole number of records.
  """
  try:
    with tarfile.open(archive, 'r:gz') as tar:
      sizes = {os.path.normpath(member.name): member.size for member in tar}
  except (tarfile.TarError, OSError, EOFError) as e:
    raise ValueError(f'{archive} is not a readable .tar.gz ({e}). {CIFAR10_FILES_HELP}') from e
  for name in ('batches.meta.txt', *_CIFAR10_BATCHES['train'], *_CIFAR10_BATCHES['test']):
    if os.path.join(_CIFAR10_FOLDER, name) not in sizes:
      raise ValueError(f'{archive} has no {_CIFAR10_FOLDER}/{name}. {CIFAR10_FILES_HELP}')
  counts = {}
  for split, names in _CIFAR10_BATCHES.items():
    counts[split] = 0
    for name in names:
      size = sizes[os.path.join(_CIFAR10_FOLDER, name)]
      if size % _CIFAR10_RECORD_BYTES:
        raise ValueError(
          f'{archive}: {_CIFAR10_FOLDER}/{name} has {size} bytes, not a whole number '
          f'of {_CIFAR10_RECORD_BYTES}-byte records. {CIFAR10_FILES_HELP}'
        )
      counts[split] += size // _CIFAR10_RECORD_BYTES
  return counts


def _check_cifar10(builder: tfds.core.DatasetBuilder, expected: dict[str, int], archive: str):
  for split, count in expected.items():
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    images, labels = data['image'], np.unique(data['label']).tolist()
    if (
      images.shape != (count, 32, 32, 3)
      or images.dtype != np.uint8
      or not set(labels) <= set(range(10))
    ):
      raise ValueError(
        f'Prepared cifar10 {split} split is wrong: images {images.shape} '
        f'{images.dtype}, labels {labels}; {archive} holds '
        f'{count} records; deleted {builder.data_dir}. Check {archive}. '
        f'{CIFAR10_FILES_HELP}'
      )


# The folder under the TFDS data dir holding `python -m alexnet_jax.prepare`'s copies.
PREPARED_FOLDER = 'alexnet_jax_prepared'
# Written last into a finished copy (its per-split counts, JSON): a copy without it is
# not read. (`_CHECKED` marks the other kind of finished data, TFDS's own builds.)
PREPARED_MARKER = 'alexnet_jax_prepared.json'


def prepared_name(config: ml_collections.ConfigDict) -> str:
  """The source's name in `prepared_dir`: `config.dataset`, or for an image folder
  `image_folder_<basename of manual_dir>_<crc32 of its absolute path>`."""
  if config.dataset == 'image_folder':
    root = os.path.abspath(os.path.expanduser(config.manual_dir or ''))
    # Two folders of one name elsewhere are two datasets: the path's hash tells them apart.
    return f'image_folder_{os.path.basename(root)}_{zlib.crc32(root.encode()):08x}'
  return config.dataset


def prepared_dir(config: ml_collections.ConfigDict) -> str:
  """Where `python -m alexnet_jax.prepare` writes, and `config.prepared` reads, the copy.

  `<data_dir>/alexnet_jax_prepared/<prepared_name>/<resize>_<resize_size>_<format>`,
  with data_dir TFDS's default (~/tensorflow_datasets, or $TFDS_DATA_DIR) when None,
  and format `jpeg<prepared_jpeg_quality>` or `raw`, e.g.
  `~/tensorflow_datasets/alexnet_jax_prepared/imagenet2012/shorter_side_256_jpeg95`.
  'pad' also names image_size, as its stored image depends on it
  (`pad_<resize_size>_<image_size>_raw`).
  """
  data_dir = os.path.expanduser(config.data_dir or tfds.core.constants.get_default_data_dir())
  size = f'{config.resize_size}'
  if config.resize == 'pad':
    size += f'_{config.image_size}'
  fmt = 'raw' if config.prepared_format == 'raw' else f'jpeg{config.prepared_jpeg_quality}'
  return os.path.join(
    data_dir, PREPARED_FOLDER, prepared_name(config), f'{config.resize}_{size}_{fmt}'
  )


def prepare_flags(config: ml_collections.ConfigDict) -> str:
  """The `--config.KEY=VALUE` flags that make `alexnet_jax.prepare` write `prepared_dir`."""
  keys = ['dataset', 'data_dir', 'manual_dir', 'resize', 'resize_size']
  if config.resize == 'pad':
    keys.append('image_size')
  keys.append('prepared_format')
  if config.prepared_format == 'jpeg':
    keys.append('prepared_jpeg_quality')
  return ' '.join(f'--config.{k}={config[k]}' for k in keys if config[k] is not None)


def _prepared_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The finished copy at `prepared_dir(config)`, read as a TFDS dataset.

  Raises:
    FileNotFoundError: naming the folder and the command that writes it, if it holds
      no finished copy.
  """
  directory = prepared_dir(config)
  if not os.path.exists(os.path.join(directory, PREPARED_MARKER)):
    state = 'holds no finished copy' if os.path.exists(directory) else 'does not exist'
    if os.path.exists(directory + '.incomplete'):
      state += f' (a copy is in progress in {directory}.incomplete: rerun to finish it)'
    raise FileNotFoundError(
      f'config.prepared=True, but {directory} {state}. Write it once with: python -m '
      f'alexnet_jax.prepare --config=YOUR_CONFIG {prepare_flags(config)} (README, '
      '"Preparing ImageNet once"), or set --config.prepared=False to read the original '
      'images.'
    )
  return tfds.builder_from_directory(directory)


def builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder of `config.dataset` (built from local files if needed);
  with `config.prepared`, the copy `python -m alexnet_jax.prepare` wrote of it
  (`prepared_dir`), which is only looked up here, never written.

  In a multi-process job process 0 prepares the dataset first and the others wait,
  so that processes sharing a filesystem do not build it concurrently; on hosts
  without a shared one each then prepares its own copy. Separate jobs on one data_dir
  take turns through a file lock there (`_preparing`): the later ones reuse the data.

  Raises:
    FileNotFoundError: if the dataset's source files (or with `config.prepared`, its
      finished copy) are missing. In a multi-process job, what any process raises is
      raised by all, with the same message (`sharding.failures_agreed`).
  """
  if jax.process_count() == 1:
    return _prepare(config)
  # The others wait for process 0, and all learn whether each process succeeded (a
  # host may lack its copy): none is left waiting in a collective.
  with sharding.failures_agreed():
    if jax.process_index() == 0:
      prepared = _prepare(config)
  with sharding.failures_agreed():
    if jax.process_index() > 0:
      prepared = _prepare(config)
  return prepared


def _prepare(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  if config.prepared:
    return _prepared_builder(config)
  if config.dataset == 'fashion_mnist':
    return prepare_fashion_mnist(config.data_dir, config.manual_dir)
  if config.dataset == 'cifar10' and config.manual_dir:  # Else TFDS downloads it.
    return prepare_cifar10(config.data_dir, config.manual_dir)
  if config.dataset == 'image_folder':
    # <manual_dir>/<split>/<class name>/<image>, e.g. Imagenette's train/ and val/.
    root = os.path.expanduser(config.manual_dir or '')
    if not os.path.isdir(root):
      raise FileNotFoundError(
        f'dataset=image_folder needs --config.manual_dir=DIR holding one folder per '
        f'split (e.g. train/, val/), each with one sub-folder of images per class; '
        f'{root!r} is not a directory.'
      )
    return tfds.ImageFolder(root)
  builder = tfds.builder(config.dataset, data_dir=config.data_dir)
  if builder.is_prepared():
    return builder
  manual_dir = config.manual_dir and os.path.expanduser(config.manual_dir)
  with _preparing(builder):
    # Another job may have prepared it while this one waited: TFDS then reuses it.
    builder = tfds.builder(config.dataset, data_dir=config.data_dir)
    try:
      builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
      )
    except AssertionError as e:  # TFDS's way of reporting missing manual files.
      raise FileNotFoundError(
        f'Cannot prepare TFDS dataset {config.dataset!r} from manual_dir='
        f'{manual_dir!r} (set --config.manual_dir): {e}'
      ) from e
  return builder


def class_names(config: ml_collections.ConfigDict) -> list[str]:
  """Label names from the dataset's metadata (folder names for image folders); with
  `config.classes`, those of its ids, in its order (the model's labels 0..k-1).

  TFDS datasets need no data for this (ImageNet's 1000 synsets come with TFDS), except
  CIFAR-10, whose names are read from its archive when prepared: '0'-'9' before.

  Raises:
    FileNotFoundError: for an image folder that does not exist.
  """
  if config.dataset == 'image_folder':
    names = builder(config).info.features['label'].names
  else:
    names = tfds.builder(config.dataset, data_dir=config.data_dir).info.features['label'].names
  return [names[i] for i in config.classes] if config.classes else list(names)
