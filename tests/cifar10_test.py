"""Tests of building TFDS `cifar10` offline from an archive in the original format."""

import io
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from alexnet_jax import datasets
from alexnet_jax import input_pipeline
from configs import cifar10

CLASS_NAMES = (
  'airplane',
  'automobile',
  'bird',
  'cat',
  'deer',
  'dog',
  'frog',
  'horse',
  'ship',
  'truck',
)
TRAIN_PER_BATCH, NUM_TEST = 4, 6


def records(images: np.ndarray, labels: np.ndarray) -> bytes:
  """uint8 [N, 32, 32, 3] and labels [N] → the binary format: per record, the label
  byte, then the 1,024 red, 1,024 green and 1,024 blue values, each plane row-major."""
  planes = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
  return np.concatenate([labels[:, None].astype(np.uint8), planes], axis=1).tobytes()


def write_archive(path, members: dict[str, bytes]):
  with tarfile.open(path, 'w:gz') as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(f'cifar-10-batches-bin/{name}')
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope='module')
def archive(tmp_path_factory):
  """A 5 × 4 + 6 record cifar-10-binary.tar.gz; returns (manual_dir, split → (images,
  labels)) in record order. Pixels are random, so any plane or axis mix-up shows."""
  rng = np.random.RandomState(0)
  expected = {
    'train': (
      rng.randint(0, 256, (5 * TRAIN_PER_BATCH, 32, 32, 3), np.uint8),
      np.arange(5 * TRAIN_PER_BATCH) % 10,
    ),
    'test': (
      rng.randint(0, 256, (NUM_TEST, 32, 32, 3), np.uint8),
      (3 * np.arange(NUM_TEST) + 1) % 10,
    ),
  }
  train_images, train_labels = expected['train']
  members = {
    f'data_batch_{i + 1}.bin': records(train_images[s], train_labels[s])
    for i in range(5)
    for s in [slice(i * TRAIN_PER_BATCH, (i + 1) * TRAIN_PER_BATCH)]
  }
  members['test_batch.bin'] = records(*expected['test'])
  members['batches.meta.txt'] = ('\n'.join(CLASS_NAMES) + '\n\n').encode()
  manual_dir = tmp_path_factory.mktemp('manual')
  write_archive(manual_dir / 'cifar-10-binary.tar.gz', members)
  return manual_dir, expected


@pytest.fixture(scope='module')
def prepared(archive, tmp_path_factory):
  """(data_dir, builder) of TFDS cifar10 prepared from `archive`, once per module."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  return data_dir, datasets.prepare_cifar10(data_dir, str(archive[0]))


def test_prepared_examples_are_the_archive_records(archive, prepared):
  _, expected = archive
  _, builder = prepared
  for split, (images, labels) in expected.items():
    seen = set()
    for example in tfds.as_numpy(builder.as_dataset(split=split)):
      # TFDS's id is the record's position in the archive, over all batch files.
      index = int(example['id'].decode().removeprefix(f'{split}_'))
      np.testing.assert_array_equal(example['image'], images[index])
      assert example['label'] == labels[index]
      seen.add(index)
    assert seen == set(range(len(images)))
  assert builder.info.splits['train'].num_examples == 20
  assert builder.info.splits['test'].num_examples == 6


def test_class_names_come_from_batches_meta(prepared):
  data_dir, builder = prepared
  assert tuple(builder.info.features['label'].names) == CLASS_NAMES
  config = cifar10.get_config()
  config.data_dir = data_dir
  assert tuple(datasets.class_names(config)) == CLASS_NAMES


def test_prepared_data_is_reused_without_the_archive(prepared):
  data_dir, builder = prepared
  assert datasets.prepare_cifar10(data_dir, '/nonexistent').data_dir == builder.data_dir


def test_missing_archive_says_where_to_get_it(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'cifar-10-binary\.tar\.gz not found') as e:
    datasets.prepare_cifar10(str(tmp_path / 'tfds'), str(tmp_path))
  assert 'https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz' in str(e.value)
  assert '--config.manual_dir=DIR' in str(e.value)


def test_partial_record_is_rejected_before_building(tmp_path):
  members = {f'data_batch_{i}.bin': bytes(3073) for i in range(1, 6)}
  members.update({'test_batch.bin': bytes(3073 + 100), 'batches.meta.txt': b'a\n'})
  write_archive(tmp_path / 'cifar-10-binary.tar.gz', members)
  with pytest.raises(ValueError, match='test_batch.bin has 3173 bytes'):
    datasets.prepare_cifar10(str(tmp_path / 'tfds'), str(tmp_path))
  assert not tfds.builder('cifar10', data_dir=str(tmp_path / 'tfds')).is_prepared()


def test_config_builds_from_manual_dir_and_gives_67_px_batches(archive, tmp_path):
  config = cifar10.get_config()
  config.data_dir = str(tmp_path / 'tfds')  # Unprepared: the build goes through builder().
  config.manual_dir = str(archive[0])
  config.update({'batch_size': 4, 'eval_batch_size': 4, 'shuffle_buffer': 20})
  data = input_pipeline.create_datasets(config)
  assert data.num_train_examples == 20 and data.num_test_examples == 6
  test = list(data.test_batches())
  assert [b['mask'].sum() for b in test] == [4, 2]
  for batch in test + [next(data.train_batches())]:
    assert batch['image'].shape == (4, 67, 67, 3) and batch['image'].dtype == np.float32
  # Standardised with CIFAR-10's statistics: pixels 0-255 map to about [-2, 2.2].
  assert -2.1 < test[0]['image'].min() and test[0]['image'].max() < 2.3
