"""Tests of `python -m alexnet_jax.prepare`: ImageNet's tars in their original layout (and
an image folder) rescaled once into a TFDS copy, resumed after a kill, read back."""

import io
import itertools
import json
import logging
import os
import re
import struct
import tarfile
import zlib

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from alexnet_jax import datasets
from alexnet_jax import input_pipeline
from alexnet_jax import prepare
from configs import fashion_mnist
from configs import imagenet
from helpers import run_module
from helpers import write_image_folder

SIZE = 67  # resize_size = image_size: the smallest the config allows.
_TFDS_IMAGENET = os.path.join(os.path.dirname(tfds.__file__), 'datasets', 'imagenet2012')
# TFDS's label names are the sorted synsets of labels.txt; line n of
# validation_labels.txt is the synset of ILSVRC2012_val_<n>.JPEG.
with open(os.path.join(_TFDS_IMAGENET, 'labels.txt')) as _f:
  SYNSETS = sorted(_f.read().split())
with open(os.path.join(_TFDS_IMAGENET, 'validation_labels.txt')) as _f:
  VAL_SYNSETS = _f.read().split()

# (synset, images) in archive order, not sorted: labels follow the synsets' names.
TRAIN_TARS = (('n15075141', 3), ('n01440764', 2), ('n02105855', 2))
VAL_NUMBERS = (1, 2, 3, 7)  # Not 1-n: labelled by number, not by position.


def jpeg(rng: np.random.RandomState, height: int = 30, width: int = 40) -> bytes:
  """A smooth colour JPEG (a gradient and mild noise), as photos are."""
  ramp = np.linspace(0, 1, width)[None, :, None] * rng.randint(60, 200, 3)
  noise = rng.rand(height, width, 3) * 25
  pixels = np.clip(ramp + noise + rng.randint(0, 50), 0, 255).astype(np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, 'JPEG', quality=90)
  return out.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_tars(folder, train: list[tuple[str, list[bytes]]], val: list[tuple[int, bytes]]):
  """ILSVRC2012_img_train.tar, of one synset tar (name, images) per `train` entry in
  that order, and ILSVRC2012_img_val.tar of `ILSVRC2012_val_<n>.JPEG` for (n, image)."""
  os.makedirs(folder, exist_ok=True)
  with tarfile.open(os.path.join(folder, 'ILSVRC2012_img_train.tar'), 'w') as outer:
    for synset, images in train:
      inner_bytes = io.BytesIO()
      with tarfile.open(fileobj=inner_bytes, mode='w') as inner:
        for i, data in enumerate(images):
          _add(inner, f'{synset}_{i}.JPEG', data)
      _add(outer, f'{synset}.tar', inner_bytes.getvalue())
  with tarfile.open(os.path.join(folder, 'ILSVRC2012_img_val.tar'), 'w') as tar:
    for n, data in val:
      _add(tar, f'ILSVRC2012_val_{n:08d}.JPEG', data)


def write_imagenet_tars(folder, bad_train: int | None = None, bad_val: bool = False) -> dict:
  """ILSVRC2012_img_train.tar (synset tars of JPEGs) and ILSVRC2012_img_val.tar in
  `folder`, as ImageNet ships them. Train image number `bad_train` (and with
  `bad_val` every validation image) is text named .JPEG. Returns, per split, the
  (bytes, label) of each image in archive order, labels from TFDS's files."""
  rng = np.random.RandomState(0)
  expected = {'train': [], 'validation': []}
  train = []
  for synset, count in TRAIN_TARS:
    images = []
    for _ in range(count):
      data = jpeg(rng)
      if len(expected['train']) == bad_train:
        data = b'not an image, only text\n'
      images.append(data)
      expected['train'].append((data, SYNSETS.index(synset)))
    train.append((synset, images))
  val = [(n, b'text\n' if bad_val else jpeg(rng, 36, 31)) for n in VAL_NUMBERS]
  expected['validation'] = [(data, SYNSETS.index(VAL_SYNSETS[n - 1])) for n, data in val]
  write_tars(folder, train, val)
  return expected


def copy_order(expected: dict) -> dict:
  """`write_imagenet_tars`'s examples in the order of the copy: train in numpy's legacy
  RandomState(0) permutation (prepare's documented order, `TRAIN_ORDER_SEED`),
  validation as archived."""
  order = np.random.RandomState(0).permutation(len(expected['train']))
  assert list(order) != sorted(order)
  return {**expected, 'train': [expected['train'][i] for i in order]}


def imagenet_config(tmp_path, **overrides):
  config = imagenet.get_config()
  config.update(
    {
      'data_dir': str(tmp_path / 'tfds'),
      'manual_dir': str(tmp_path / 'tars'),
      'resize_size': SIZE,
      'image_size': SIZE,
      'prepared_format': 'raw',
      **overrides,
    }
  )
  return config


def read_back(config, split: str, decode: bool = True) -> list[tuple[np.ndarray, int]]:
  """(image, label) of every example of the copy's `split` through `datasets.builder`."""
  config = config.copy_and_resolve_references()
  config.prepared = True
  decoders = None if decode else {'image': tfds.decode.SkipDecoding()}
  ds = datasets.builder(config).as_dataset(split=split, decoders=decoders)
  return [(e['image'], int(e['label'])) for e in tfds.as_numpy(ds)]


def stored(data: bytes, config) -> np.ndarray:
  return input_pipeline.stored_image(tf.constant(data), config).numpy()


@pytest.mark.parametrize('fmt', ['raw', 'jpeg'])
def test_imagenet_tars_become_a_tfds_copy_of_the_stored_images(tmp_path, fmt):
  expected = copy_order(write_imagenet_tars(tmp_path / 'tars'))
  config = imagenet_config(tmp_path, prepared_format=fmt)
  directory = prepare.prepare(config)
  name = f'shorter_side_{SIZE}_raw' if fmt == 'raw' else f'shorter_side_{SIZE}_jpeg95'
  assert directory == str(tmp_path / 'tfds' / 'alexnet_jax_prepared' / 'imagenet2012' / name)
  assert not os.path.exists(directory + '.incomplete')
  for split, examples in expected.items():
    copy = read_back(config, split)
    assert [label for _, label in copy] == [label for _, label in examples]
    for (image, _), (data, _) in zip(copy, examples, strict=True):
      assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
      want = stored(data, config)
      if fmt == 'raw':
        np.testing.assert_array_equal(image, want)
      else:
        assert np.abs(image.astype(int) - want).mean() < 2
    if fmt == 'jpeg':  # The JPEG written is stored as it is, at quality 95.
      stored_bytes = [image for image, _ in read_back(config, split, decode=False)]
      assert stored_bytes == [
        tf.io.encode_jpeg(stored(data, config), quality=95).numpy() for data, _ in examples
      ]
  builder = tfds.builder_from_directory(directory)
  assert builder.info.features['label'].names == SYNSETS
  # Even splits (a job's processes each reading a part) cover the split, in order.
  labels = [label for _, label in expected['train']]
  parts = [
    [int(e['label']) for e in tfds.as_numpy(builder.as_dataset(split=part))]
    for part in tfds.even_splits('train', 3)
  ]
  assert [len(p) for p in parts] == [3, 2, 2] and sum(parts, []) == labels


def test_a_killed_prepare_resumes_where_it_stopped(tmp_path, monkeypatch):
  write_imagenet_tars(tmp_path / 'tars')
  monkeypatch.setattr(prepare, 'SHARD_EXAMPLES', 2)  # train: 4 shards, validation 2.
  whole = prepare.prepare(imagenet_config(tmp_path, data_dir=str(tmp_path / 'whole')))

  commit = prepare._commit_shard
  committed = []

  def killed_after_two(*args):
    if len(committed) == 2:
      raise KeyboardInterrupt('killed')
    commit(*args)
    committed.append(args[2])

  config = imagenet_config(tmp_path)
  monkeypatch.setattr(prepare, '_commit_shard', killed_after_two)
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare(config)
  directory = datasets.prepared_dir(config)
  assert not os.path.exists(directory)
  work = os.path.join(directory + '.incomplete', 'work')
  finished = {
    name: os.stat(os.path.join(work, name)).st_ino
    for name in ('train-00000.tfrecord', 'train-00001.tfrecord')
  }
  with pytest.raises(
    FileNotFoundError, match=r'does not exist \(a copy is in progress in .*\.incomplete: rerun'
  ):
    read_back(config, 'train')

  monkeypatch.setattr(prepare, '_commit_shard', commit)
  skips = []
  train_examples = prepare._train_examples
  monkeypatch.setattr(
    prepare, '_train_examples', lambda *a: (skips.append(a[-1]), train_examples(*a))[1]
  )
  assert prepare.prepare(config) == directory
  assert skips == [4]  # The rerun read the train tar from its 5th image on.
  # The finished shards were kept (renamed to TFDS's names), not written again.
  assert (
    os.stat(os.path.join(directory, 'imagenet2012-train.tfrecord-00000-of-00004')).st_ino
    == (finished['train-00000.tfrecord'])
  )
  assert (
    os.stat(os.path.join(directory, 'imagenet2012-train.tfrecord-00001-of-00004')).st_ino
    == (finished['train-00001.tfrecord'])
  )
  # The same files, byte for byte, as the uninterrupted run's.
  names = sorted(os.listdir(whole))
  assert names == sorted(os.listdir(directory))
  for name in names:
    with open(os.path.join(whole, name), 'rb') as a, open(os.path.join(directory, name), 'rb') as b:
      assert a.read() == b.read(), name

  with pytest.raises(FileExistsError, match=f'{directory} already exists .a finished copy'):
    prepare.prepare(config)


def test_undecodable_images_are_skipped_and_counted(tmp_path, caplog, monkeypatch):
  archived = write_imagenet_tars(tmp_path / 'tars', bad_train=3)
  expected = copy_order(archived)
  bad = [data for data, _ in expected['train']].index(archived['train'][3][0])
  config = imagenet_config(tmp_path)
  monkeypatch.setattr(prepare, 'PROGRESS_SECONDS', 0)  # A progress line per image.
  with caplog.at_level(logging.INFO):
    directory = prepare.prepare(config)
  with open(os.path.join(directory, datasets.PREPARED_MARKER)) as f:
    splits = json.load(f)['splits']
  assert {k: (v['examples'], v['skipped']) for k, v in splits.items()} == {
    'train': (6, 1),
    'validation': (4, 0),
  }
  assert f'train example {bad} (n01440764_0.JPEG) does not decode: skipped' in caplog.text
  progress = r'train: {}/7 \(\d+\.\d%\), \d+ img/s, ETA \d\d:\d\d:\d\d, {} undecodable skipped'
  assert re.search(progress.format(2, 0), caplog.text)
  assert re.search(progress.format(7, 1), caplog.text)  # The split's last line.
  kept = expected['train'][:bad] + expected['train'][bad + 1 :]
  copy = read_back(config, 'train')
  assert [label for _, label in copy] == [label for _, label in kept]
  for (image, _), (data, _) in zip(copy, kept, strict=True):
    np.testing.assert_array_equal(image, stored(data, config))


def test_a_split_where_no_image_decodes_fails(tmp_path):
  write_imagenet_tars(tmp_path / 'tars', bad_val=True)
  config = imagenet_config(tmp_path)
  with pytest.raises(ValueError, match=r"No image of split 'validation' decodes \(4 of 4"):
    prepare.prepare(config)
  assert not os.path.exists(datasets.prepared_dir(config))


@pytest.mark.slow
def test_missing_tar_is_named_in_one_line(tmp_path):
  write_imagenet_tars(tmp_path / 'tars')
  os.remove(tmp_path / 'tars' / 'ILSVRC2012_img_train.tar')
  result = run_module(
    'alexnet_jax.prepare',
    '--config=configs/imagenet.py',
    f'--config.manual_dir={tmp_path / "tars"}',
    f'--config.data_dir={tmp_path / "tfds"}',
  )
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(
    f'FileNotFoundError: ILSVRC2012_img_train.tar not found in folder {tmp_path / "tars"}.'
  )
  assert 'ILSVRC2012_img_val.tar not found' not in last
  assert not os.path.exists(tmp_path / 'tfds' / 'alexnet_jax_prepared')


def test_image_folder_prepared_raw(tmp_path):
  root = tmp_path / 'toy'
  write_image_folder(str(root))
  config = fashion_mnist.get_config()
  config.update(
    dataset='image_folder', manual_dir=str(root), data_dir=str(tmp_path), prepared_format='raw'
  )
  directory = prepare.prepare(config)
  assert directory == str(
    tmp_path
    / 'alexnet_jax_prepared'
    / f'image_folder_toy_{zlib.crc32(str(root).encode()):08x}'  # Another toy/: another copy.
    / 'shorter_side_67_raw'
  )
  source = tfds.ImageFolder(str(root))
  for split, count in (('train', 80), ('val', 37)):
    paths = [
      e['image/filename'].decode()
      for e in tfds.as_numpy(
        source.as_dataset(split=split, decoders={'image': tfds.decode.SkipDecoding()})
      )
    ]
    copy = read_back(config, split)
    assert len(copy) == len(paths) == count
    for (image, label), path in zip(copy, paths, strict=True):
      assert label == int(os.path.basename(os.path.dirname(path)).removeprefix('class'))
      with open(path, 'rb') as f:
        np.testing.assert_array_equal(image, stored(f.read(), config))
  prepared = config.copy_and_resolve_references()
  prepared.prepared = True
  assert datasets.class_names(prepared) == [f'class{i}' for i in range(10)]


def test_empty_image_folder_fails(tmp_path):
  os.makedirs(tmp_path / 'empty')
  config = fashion_mnist.get_config()
  config.update(dataset='image_folder', manual_dir=str(tmp_path / 'empty'), data_dir=str(tmp_path))
  with pytest.raises(ValueError, match='holds no split'):
    prepare.prepare(config)


def test_reading_a_copy_never_prepared_names_the_command(tmp_path):
  config = imagenet_config(tmp_path, prepared=True, prepared_format='jpeg')
  directory = tmp_path / 'tfds' / 'alexnet_jax_prepared' / 'imagenet2012' / 'shorter_side_67_jpeg95'
  assert datasets.prepared_dir(config) == str(directory)
  with pytest.raises(FileNotFoundError) as error:
    datasets.builder(config)
  message = str(error.value)
  assert f'{directory} does not exist' in message
  assert 'python -m alexnet_jax.prepare --config=' in message
  assert '--config.resize_size=67 --config.prepared_format=jpeg' in message


def distinct_per_batch(batches) -> list[int]:
  return [len(set(batch['label'].tolist())) for batch in batches]


@pytest.mark.slow  # Prepares 3,000 images and reads them 3 times: ~10 s on 2 cores.
def test_imagenet_in_its_real_order_is_read_in_batches_of_many_classes(tmp_path, monkeypatch):
  """100 synset tars of 30 images in ImageNet's order (synsets sorted), prepared, read
  with the default shuffle buffer's share of the split (16,384 / 1,281,167 = 1.3%):
  every batch of 64 holds >= 80% of the distinct classes an i.i.d. draw of 64 would
  (C (1 - (1 - 1/C)^B) = 47.4), and each of 2 processes' parts (even splits) meets >= 90
  of the 100 classes in its first 10 batches. Written in the tars' order, the copy
  gave 8.2 classes a batch and 12-13 per part (issue 27)."""
  classes, per_class, batch = 100, 30, 64
  image = jpeg(np.random.RandomState(0), 8, 8)
  write_tars(
    tmp_path / 'tars',
    [(synset, [image] * per_class) for synset in SYNSETS[:classes]],
    [(1, image), (2, image)],
  )
  monkeypatch.setattr(prepare, 'SHARD_EXAMPLES', 64)  # 47 files.
  # Images of 8² (the copy holds 8² too): the labels are what is looked at.
  config = imagenet_config(tmp_path, batch_size=batch, resize_size=8, image_size=8)
  prepare.prepare(config)
  config.update(prepared=True, shuffle_buffer=round(classes * per_class * 16_384 / 1_281_167))
  iid = classes * (1 - (1 - 1 / classes) ** batch)
  whole = input_pipeline.create_datasets(config)
  counts = distinct_per_batch(itertools.islice(whole.train_batches(), 10))
  assert min(counts) >= 0.8 * iid, (counts, iid)
  for part in (0, 1):
    data = input_pipeline.create_datasets(config, part, 2)
    labels = {int(x) for b in itertools.islice(data.train_batches(), 10) for x in b['label']}
    assert len(labels) >= 0.9 * classes, (part, len(labels))


def truncate(path: str, how: str):
  """Cuts a TFRecord file inside its last record ('mid-record'), or after its first
  record ('whole records': a file that ends cleanly, short of its metadata's count)."""
  size = os.path.getsize(path)
  if how == 'mid-record':
    keep = size - 10
  else:
    with open(path, 'rb') as f:
      [length] = struct.unpack('<Q', f.read(8))
    keep = 8 + 4 + length + 4  # Length, its CRC, the data, its CRC.
    assert keep < size
  with open(path, 'r+b') as f:
    f.truncate(keep)


@pytest.mark.parametrize('how', ['mid-record', 'whole records'])
def test_a_truncated_shard_stops_training_with_an_error_naming_it(tmp_path, monkeypatch, how):
  """Not a silently shorter epoch: the train stream fails, naming the shard."""
  write_imagenet_tars(tmp_path / 'tars')
  monkeypatch.setattr(prepare, 'SHARD_EXAMPLES', 2)  # 4 train shards: 2, 2, 2, 1.
  config = imagenet_config(tmp_path)
  directory = prepare.prepare(config)
  shard = os.path.join(directory, 'imagenet2012-train.tfrecord-00001-of-00004')
  truncate(shard, how)
  config.update(prepared=True, batch_size=2, shuffle_buffer=7)
  data = input_pipeline.create_datasets(config)
  assert data.steps_per_epoch == 3
  with pytest.raises(ValueError, match=f"Reading split 'train' of .*: {re.escape(shard)} "):
    list(itertools.islice(data.train_batches(), 6))


@pytest.mark.parametrize('how', ['mid-record', 'whole records'])
def test_a_shard_truncated_while_prepared_leaves_no_finished_copy(tmp_path, monkeypatch, how):
  """Every record of every shard is counted before the copy counts as finished: a
  middle shard, which a read of the first and last example never touches."""
  write_imagenet_tars(tmp_path / 'tars')
  monkeypatch.setattr(prepare, 'SHARD_EXAMPLES', 2)
  commit = prepare._commit_shard

  def commit_then_truncate(work, split, shard, counts):
    commit(work, split, shard, counts)
    if (split, shard) == ('train', 1):
      truncate(prepare._shard_path(work, split, shard, 'tfrecord'), how)

  monkeypatch.setattr(prepare, '_commit_shard', commit_then_truncate)
  config = imagenet_config(tmp_path)
  directory = datasets.prepared_dir(config)
  shard = os.path.join(directory + '.incomplete', 'imagenet2012-train.tfrecord-00001-of-00004')
  with pytest.raises(ValueError, match=f'reads back wrong: {re.escape(shard)} '):
    prepare.prepare(config)
  assert not os.path.exists(directory)
  assert not os.path.exists(os.path.join(directory + '.incomplete', datasets.PREPARED_MARKER))
