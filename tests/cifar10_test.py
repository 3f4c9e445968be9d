"""Tests of building TFDS `cifar10` offline from an archive in the original format."""

import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from alexnet_jax import augment
from alexnet_jax import datasets
from alexnet_jax import input_pipeline
from configs import cifar10
from helpers import run_together

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


def make_archive(manual_dir, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Writes a 5 × 4 + 6 record `manual_dir/cifar-10-binary.tar.gz`; returns split →
  (images, labels) in record order. Pixels are random (from `seed`), so any plane or
  axis mix-up shows."""
  rng = np.random.RandomState(seed)
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
  write_archive(manual_dir / 'cifar-10-binary.tar.gz', members)
  return expected


@pytest.fixture(scope='module')
def archive(tmp_path_factory):
  """(manual_dir, split → (images, labels)) of a `make_archive` archive."""
  manual_dir = tmp_path_factory.mktemp('manual')
  return manual_dir, make_archive(manual_dir)


@pytest.fixture(scope='module')
def prepared(archive, tmp_path_factory):
  """(data_dir, builder) of TFDS cifar10 prepared from `archive`, once per module."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  return data_dir, datasets.prepare_cifar10(data_dir, str(archive[0]))


def assert_holds(builder, expected):
  """The builder's splits hold exactly `expected`'s records (`make_archive`)."""
  for split, (images, labels) in expected.items():
    seen = set()
    for example in tfds.as_numpy(builder.as_dataset(split=split)):
      # TFDS's id is the record's position in the archive, over all batch files.
      index = int(example['id'].decode().removeprefix(f'{split}_'))
      np.testing.assert_array_equal(example['image'], images[index])
      assert example['label'] == labels[index]
      seen.add(index)
    assert seen == set(range(len(images)))


@pytest.mark.slow
def test_prepared_examples_are_the_archive_records(archive, prepared):
  _, builder = prepared
  assert_holds(builder, archive[1])
  assert builder.info.splits['train'].num_examples == 20
  assert builder.info.splits['test'].num_examples == 6


@pytest.mark.slow
def test_class_names_come_from_batches_meta(prepared):
  data_dir, builder = prepared
  assert tuple(builder.info.features['label'].names) == CLASS_NAMES
  config = cifar10.get_config()
  config.data_dir = data_dir
  assert tuple(datasets.class_names(config)) == CLASS_NAMES


@pytest.mark.slow
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


@pytest.mark.slow
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
    assert batch['image'].shape == (4, 67, 67, 3) and batch['image'].dtype == np.uint8
  # Standardised with CIFAR-10's statistics: pixels 0-255 map to about [-2, 2.2].
  images = np.asarray(augment.model_input(test[0], (config.pixel_mean, config.pixel_std)))
  assert -2.1 < images.min() and images.max() < 2.3


def digest(images, labels) -> list[list]:
  """[label, sha256 of the pixels] per record, in record order."""
  return [
    [int(label), hashlib.sha256(image.tobytes()).hexdigest()]
    for image, label in zip(images, labels, strict=True)
  ]


# A job's first run (`datasets.builder`, as the input pipeline calls it) on a fresh
# data_dir; prints what it then reads, in record order (TFDS's ids).
FIRST_RUN = """
import hashlib, json, sys
from absl import logging
import tensorflow_datasets as tfds
from alexnet_jax import datasets
from configs import cifar10

logging.set_verbosity(logging.INFO)
config = cifar10.get_config()
config.update(manual_dir=sys.argv[2], data_dir=sys.argv[3])
start_together()
builder = datasets.builder(config)
read = {}
for split in ('train', 'test'):
  examples = sorted(
    (int(e['id'].decode().split('_')[1]), int(e['label']), hashlib.sha256(e['image'].tobytes()).hexdigest())
    for e in tfds.as_numpy(builder.as_dataset(split=split))
  )
  read[split] = [[label, sha] for _, label, sha in examples]
print('READ', json.dumps(read))
"""


@pytest.mark.slow
def test_separate_jobs_on_a_fresh_data_dir_prepare_it_once_and_read_the_same(archive, tmp_path):
  """Sweep points run in parallel (or SLURM array tasks) start their first runs on one
  data_dir together: the first job prepares, the other waits for its lock and reuses
  the data (without: TFDS's download cache and temporary folder are written by both)."""
  manual_dir, expected = archive
  jobs = run_together(FIRST_RUN, 2, tmp_path, args=(manual_dir, tmp_path / 'tfds'))
  for code, log in jobs:
    assert code == 0, log[-3000:]
    [line] = [line for line in log.splitlines() if line.startswith('READ ')]
    assert json.loads(line.removeprefix('READ ')) == {
      split: digest(*records) for split, records in expected.items()
    }
  waited = ['Waiting for another job preparing cifar10' in log for _, log in jobs]
  assert sorted(waited) == [False, True]


def extractions(data_dir) -> list[str]:
  folder = os.path.join(data_dir, 'downloads', 'extracted')
  return os.listdir(folder) if os.path.isdir(folder) else []


@pytest.mark.slow
def test_data_that_failed_the_check_are_deleted_and_rebuilt_from_the_new_archive(
  tmp_path, monkeypatch
):
  """Data failing the check must not count as prepared, and neither may TFDS's
  extraction of that archive (TFDS reuses one whatever the archive holds now)."""
  data_dir, manual_dir = str(tmp_path / 'tfds'), tmp_path / 'manual'
  os.makedirs(manual_dir)
  make_archive(manual_dir, seed=1)
  counts = datasets._cifar10_record_counts
  # Expecting one record more than the archive holds: the real check then fails.
  monkeypatch.setattr(
    datasets,
    '_cifar10_record_counts',
    lambda archive: {split: n + 1 for split, n in counts(archive).items()},
  )
  with pytest.raises(ValueError, match=r'Prepared cifar10 train split is wrong: images \(20,') as e:
    datasets.prepare_cifar10(data_dir, str(manual_dir))
  assert not tfds.builder('cifar10', data_dir=data_dir).is_prepared()
  assert extractions(data_dir) == []
  assert 'deleted' in str(e.value) and 'Delete' not in str(e.value)
  monkeypatch.undo()

  expected = make_archive(manual_dir, seed=2)  # The user's fixed archive.
  builder = datasets.prepare_cifar10(data_dir, str(manual_dir))
  assert_holds(builder, expected)


# A job killed (SIGKILL: no handler runs) during the check of the data it prepared.
KILLED_IN_CHECK = """
import os, signal, sys
from alexnet_jax import datasets

datasets._check_cifar10 = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
start_together()
datasets.prepare_cifar10(sys.argv[3], sys.argv[2])
"""


@pytest.mark.slow
def test_data_whose_check_was_killed_are_checked_by_the_next_run(archive, tmp_path, monkeypatch):
  manual_dir, expected = archive
  data_dir = tmp_path / 'tfds'
  [(code, log)] = run_together(KILLED_IN_CHECK, 1, tmp_path, args=(manual_dir, data_dir))
  assert code == -9, log[-3000:]
  checks = []
  check = datasets._check_cifar10
  monkeypatch.setattr(
    datasets, '_check_cifar10', lambda *args: checks.append(args[1]) or check(*args)
  )
  builder = datasets.prepare_cifar10(str(data_dir), str(manual_dir))
  assert checks == [{'train': 20, 'test': 6}]
  assert_holds(builder, expected)
