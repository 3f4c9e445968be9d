"""Datasets on disk: TFDS builders prepared from the user's local files, class names.

Nothing here downloads at run time when the original files are given: Fashion-MNIST's
IDX files are placed in TFDS's download cache; ImageNet is built from its tars.
"""

import json
import os
import shutil

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import resource as tfds_resource

FASHION_MNIST_FILES_HELP = (
    'Fashion-MNIST is read from its original IDX files (train-images-idx3-ubyte.gz, '
    'train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz). '
    'On Debian/Ubuntu: `sudo apt-get install dataset-fashion-mnist` puts them in '
    '/usr/share/datasets/fashion-mnist; elsewhere download them from '
    'https://github.com/zalandoresearch/fashion-mnist and pass '
    '--config.manual_dir=DIR.')


def prepare_fashion_mnist(data_dir: str | None, manual_dir: str) -> tfds.core.DatasetBuilder:
  """Builds TFDS `fashion_mnist` from local IDX files, without network access.

  TFDS's registered checksums do not match Debian's re-gzipped files, so the files
  are placed in the builder's download cache (with the `.INFO` record TFDS writes
  after a download) and the decoded data is checked instead.

  Raises:
    FileNotFoundError: if a file is missing from `manual_dir`.
    ValueError: if the prepared data are not Fashion-MNIST's 60,000 + 10,000
      28×28×1 uint8 images with labels 0-9.
  """
  builder = tfds.builder('fashion_mnist', data_dir=data_dir)
  if builder.is_prepared():
    return builder
  download_dir = os.path.join(builder.data_dir_root, 'downloads')
  os.makedirs(download_dir, exist_ok=True)
  for url, info in builder.url_infos.items():
    source = os.path.join(manual_dir, info.filename)
    if not os.path.exists(source):
      raise FileNotFoundError(f'{source} not found. {FASHION_MNIST_FILES_HELP}')
    target = os.path.join(
        download_dir, tfds_resource.get_dl_fname(url, info.checksum))
    shutil.copyfile(source, target)
    with open(target + '.INFO', 'w') as f:
      json.dump({'urls': [url], 'original_fname': info.filename}, f)
  builder.download_and_prepare(download_dir=download_dir)
  _check_fashion_mnist(builder)
  return builder


def _check_fashion_mnist(builder: tfds.core.DatasetBuilder):
  for split, expected in (('train', 60_000), ('test', 10_000)):
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    images, labels = data['image'], data['label']
    if (images.shape != (expected, 28, 28, 1) or images.dtype != np.uint8
        or set(np.unique(labels)) != set(range(10))):
      raise ValueError(
          f'Prepared fashion_mnist {split} split is wrong: images {images.shape} '
          f'{images.dtype}, labels {sorted(set(np.unique(labels)))}. Delete '
          f'{builder.data_dir} and check the source files. {FASHION_MNIST_FILES_HELP}')


def builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  if config.dataset == 'fashion_mnist':
    return prepare_fashion_mnist(config.data_dir, config.manual_dir)
  if config.dataset == 'image_folder':
    # <manual_dir>/<split>/<class name>/<image>, e.g. Imagenette's train/ and val/.
    root = os.path.expanduser(config.manual_dir or '')
    if not os.path.isdir(root):
      raise FileNotFoundError(
          f'dataset=image_folder needs --config.manual_dir=DIR holding one folder per '
          f'split (e.g. train/, val/), each with one sub-folder of images per class; '
          f'{root!r} is not a directory.')
    return tfds.ImageFolder(root)
  builder = tfds.builder(config.dataset, data_dir=config.data_dir)
  manual_dir = config.manual_dir and os.path.expanduser(config.manual_dir)
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir))
  except AssertionError as e:  # TFDS's way of reporting missing manual files.
    raise FileNotFoundError(
        f'Cannot prepare TFDS dataset {config.dataset!r} from manual_dir='
        f'{manual_dir!r} (set --config.manual_dir): {e}') from e
  return builder


def class_names(config: ml_collections.ConfigDict) -> list[str]:
  """Label names from the dataset's metadata (folder names for image folders).

  TFDS datasets need no data for this (ImageNet's 1000 synsets come with TFDS).

  Raises:
    FileNotFoundError: for an image folder that does not exist.
  """
  if config.dataset == 'image_folder':
    names = builder(config).info.features['label'].names
  else:
    names = tfds.builder(config.dataset, data_dir=config.data_dir).info.features['label'].names
  return list(names)
