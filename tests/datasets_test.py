"""Tests of preparing TFDS datasets once: separate jobs on one data_dir, and data that
failed their check (CIFAR-10's, built from small archives, are in cifar10_test)."""

import json
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from alexnet_jax import datasets
from helpers import run_together

DEBIAN_FASHION_MNIST = '/usr/share/datasets/fashion-mnist'


class TinyCounts(tfds.core.GeneratorBasedBuilder):
  """`tiny_counts`: 5 examples {'x': 0-4}, prepared by TFDS alone (as ImageNet is, on
  `datasets._prepare`'s generic path), in a second: jobs started together overlap."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({'x': np.int64}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    time.sleep(1)
    for i in range(5):
      yield i, {'x': i}


# A job's first run on a fresh data_dir; prints what it then reads.
FIRST_RUN = """
import json, sys
from absl import logging
import tensorflow_datasets as tfds
import datasets_test  # Registers tiny_counts.
from alexnet_jax import datasets
from configs import default

logging.set_verbosity(logging.INFO)
config = default.get_config()
config.update(dataset='tiny_counts', data_dir=sys.argv[2])
start_together()
builder = datasets.builder(config)
print('READ', json.dumps(sorted(int(e['x']) for e in tfds.as_numpy(builder.as_dataset(split='train')))))
"""


@pytest.mark.slow
def test_separate_jobs_prepare_a_tfds_dataset_once(tmp_path):
  """Without the lock both build tiny_counts, and the second one's rename of TFDS's
  temporary folder fails (FileExistsError)."""
  jobs = run_together(FIRST_RUN, 2, tmp_path, args=(tmp_path / 'tfds',))
  for code, log in jobs:
    assert code == 0, log[-3000:]
    [line] = [line for line in log.splitlines() if line.startswith('READ ')]
    assert json.loads(line.removeprefix('READ ')) == [0, 1, 2, 3, 4]
  waited = ['Waiting for another job preparing tiny_counts' in log for _, log in jobs]
  assert sorted(waited) == [False, True]


def test_data_that_failed_their_check_are_never_prepared(tmp_path):
  """`_prepare_checked`, as Fashion-MNIST's and CIFAR-10's preparations use it (CIFAR-10's
  own data: cifar10_test): data TFDS counts as prepared but whose check failed are
  deleted, and the next call builds and checks them again."""
  data_dir = str(tmp_path)

  def failing(builder):
    builder.download_and_prepare()
    assert builder.is_prepared()  # What the check sees: data TFDS counts as prepared.
    raise ValueError('tiny_counts train split is wrong')

  with pytest.raises(ValueError, match='train split is wrong'):
    datasets._prepare_checked('tiny_counts', data_dir, failing)  # pylint: disable=protected-access
  assert not tfds.builder('tiny_counts', data_dir=data_dir).is_prepared()
  builder = datasets._prepare_checked(  # pylint: disable=protected-access
    'tiny_counts', data_dir, lambda b: b.download_and_prepare()
  )
  assert builder.is_prepared()
  assert sorted(int(e['x']) for e in tfds.as_numpy(builder.as_dataset(split='train'))) == list(
    range(5)
  )
