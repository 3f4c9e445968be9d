"""Tests of config validation, durations and the config kept with a run."""

import json
import re

import ml_collections
import numpy as np
import pytest

from alexnet_jax import config_lib
from alexnet_jax import optimizers
from configs import caffe_bvlc_alexnet
from configs import cifar10
from configs import default
from configs import fashion_mnist
from configs import finetune
from configs import imagenet
from configs import imagenet_large_batch
from configs import torchvision_alexnet


@pytest.mark.parametrize(
  'get_config',
  [
    default.get_config,
    fashion_mnist.get_config,
    imagenet.get_config,
    imagenet_large_batch.get_config,
    cifar10.get_config,
    caffe_bvlc_alexnet.get_config,
    torchvision_alexnet.get_config,
  ],
)
def test_every_shipped_config_is_valid(get_config):
  config_lib.validate(get_config(), num_devices=4, num_processes=2)


@pytest.mark.parametrize(
  'key, value, allowed',
  [
    ('dropout_rate', 1.0, r'a number in \[0, 1\)'),
    ('learning_rate', -1.0, r'a number in \(0, inf\)'),
    ('eval_batch_size', -4, 'an integer >= 1'),
    ('batch_size', 0, 'an integer >= 1'),
    ('dtype', 'float8', "one of 'float32', 'bfloat16', 'float16'"),
    ('augment.crop', 'foo', "one of 'paper', 'inception'"),
    ('momentum', 1.0, r'a number in \[0, 1\)'),
    ('weight_decay', -5e-4, r'a number in \[0, inf\)'),
    ('image_size', 63, 'an integer >= 67'),
    ('init', 'xavier', "one of 'paper', 'he'"),
    ('model', 'vgg16', "one of 'alexnet', 'alexnet_bn', 'alexnet_owt'"),
    ('lr_schedule', 'linear', "one of 'step', 'cosine', 'polynomial', 'constant'"),
    ('eval_crops', 5, 'one of 1, 2, 10'),
    ('lrn', 'pytorch', "one of 'cuda-convnet', 'paper-text', 'caffe'"),
    ('num_train_steps', 0, 'None or an integer >= 1'),
    ('eval_every_epochs', 0.0, r'None or a number in \(0, inf\)'),
    ('pixel_std', (1.0, 0.0, 1.0), r'a sequence of 3 values, each a number in \(0, inf\)'),
    ('mesh.model', 4, 'None or one of 1, 2'),
  ],
)
def test_a_bad_value_names_its_key_value_and_what_is_allowed(key, value, allowed):
  config = fashion_mnist.get_config()
  config.update_from_flattened_dict({key: value})
  prefix = re.escape(f'config.{key}={value!r}: must be ')
  with pytest.raises(config_lib.ConfigError, match=rf'^{prefix}{allowed}\.$'):
    config_lib.validate(config)


def test_keys_that_must_fit_together():
  config = fashion_mnist.get_config()
  config.image_size = 99
  with pytest.raises(
    config_lib.ConfigError, match='image_size=99 must be <= config.resize_size=67'
  ):
    config_lib.validate(config)
  config = fashion_mnist.get_config()
  config.num_epochs = None
  with pytest.raises(config_lib.ConfigError, match='num_train_steps and config.num_epochs'):
    config_lib.validate(config)
  config = fashion_mnist.get_config()
  config.dataset = 'fashion_mnits'
  with pytest.raises(config_lib.ConfigError, match="dataset='fashion_mnits'"):
    config_lib.validate(config)
  config = ml_collections.ConfigDict({**fashion_mnist.get_config().to_dict(), 'extra': 1})
  with pytest.raises(config_lib.ConfigError, match='config.extra=1: unknown key'):
    config_lib.validate(config)


def test_batch_sizes_must_split_over_the_mesh():
  config = fashion_mnist.get_config()
  config.batch_size = 6
  config_lib.validate(config, num_devices=4, num_processes=2)  # mesh 2 × 2.
  config.mesh.model = 1  # mesh 4 × 1.
  with pytest.raises(config_lib.ConfigError, match='batch_size=6 must be divisible by the 4'):
    config_lib.validate(config, num_devices=4, num_processes=2)
  config.mesh.data = 3
  with pytest.raises(config_lib.ConfigError, match='must equal the 4 devices'):
    config_lib.validate(config, num_devices=4)


def test_durations_in_steps_or_epochs():
  config = fashion_mnist.get_config()  # 10 epochs, eval every epoch, warm-up 300 steps.
  assert config_lib.steps(config, 'total', 468) == 4680
  assert config_lib.steps(config, 'eval_every', 468) == 468
  assert config_lib.steps(config, 'warmup', 468) == 300
  config.num_train_steps = 10  # Steps, when set, win over epochs.
  config.eval_every_epochs = 0.5
  config.warmup_steps = None
  config.warmup_epochs = 0.25
  assert config_lib.steps(config, 'total', 468) == 10
  assert config_lib.steps(config, 'eval_every', 468) == 234
  assert config_lib.steps(config, 'warmup', 468) == 117
  config = imagenet.get_config()
  assert config_lib.steps(config, 'lr_decay', 10_009) == [300_270, 600_540, 800_720]
  config.lr_decay_steps = (5, 7)
  assert config_lib.steps(config, 'lr_decay', 10_009) == [5, 7]
  config.eval_every_epochs = None
  with pytest.raises(config_lib.ConfigError, match='eval_every_steps and config.eval_every'):
    config_lib.steps(config, 'eval_every', 10)


def test_a_finetune_lasts_caffes_epochs_of_its_own_data_not_the_bases_steps():
  """Caffe's finetune_flickr_style: 100,000 iterations of 50 on 80,000 images, /10 every
  20,000; i.e. 62.5 epochs, decays at epochs 12.5, 25, 37.5, 50, rate 0.001 at batch 50."""
  config = finetune.get_config('caffe_bvlc_alexnet')  # The base: 450,000 steps of 256.
  steps_per_epoch = 80_000 // 256  # 312: Flickr Style's 80,000 images at batch 256.
  num_steps = config_lib.steps(config, 'total', steps_per_epoch)
  assert num_steps == 19_500  # 62.5 * 312; not 450,000.
  assert config_lib.steps(config, 'lr_decay', steps_per_epoch) == [3_900, 7_800, 11_700, 15_600]
  schedule = optimizers.create_learning_rate_schedule(config, steps_per_epoch, num_steps)
  rate = 0.001 * 256 / 50  # Caffe's rate at batch 50, scaled linearly to 256.
  steps = [0, 3_899, 3_900, 7_799, 7_800, 11_700, 15_599, 15_600, 19_499]
  expected = [rate, rate, rate / 10, rate / 10, rate / 100, rate / 1e3, rate / 1e3]
  expected += [rate / 1e4, rate / 1e4]
  np.testing.assert_allclose([float(schedule(s)) for s in steps], expected, rtol=1e-5)

  # README's fine-tune: 5 classes of 50 images at Caffe's batch of 50, 5 steps an epoch.
  config = finetune.get_config('fashion_mnist')
  config.batch_size = 50
  assert config_lib.steps(config, 'total', 5) == 312  # 62.5 * 5 = 312.5, to even.
  assert config_lib.steps(config, 'lr_decay', 5) == [62, 125, 188, 250]
  assert config_lib.steps(config, 'eval_every', 5) == 62
  schedule = optimizers.create_learning_rate_schedule(config, 5, 312)
  assert float(schedule(0)) == pytest.approx(0.001, rel=1e-6)


def test_saved_config_round_trips(tmp_path):
  config = imagenet.get_config()
  config_lib.save(config, str(tmp_path))
  with open(tmp_path / 'config.json') as f:
    assert json.load(f)['lr_decay_epochs'] == [30, 60, 80]
  loaded = config_lib.load(str(tmp_path))
  assert config_lib.differences(config, loaded) == {}
  assert loaded.pixel_mean == (123.68, 116.78, 103.94)  # Tuples again.
  assert config_lib.load(str(tmp_path / 'none')) is None


def test_rerun_with_a_changed_config_is_refused_unless_allowed(tmp_path):
  workdir = str(tmp_path)
  config = fashion_mnist.get_config()
  assert config_lib.check_rerun(config, workdir) == {}  # A new workdir.
  config_lib.save(config, workdir)
  bookkeeping = fashion_mnist.get_config()
  bookkeeping.update(eval_batch_size=1000, log_every_steps=10, keep_checkpoints=1)
  bookkeeping.mesh.model = 1
  assert config_lib.check_rerun(bookkeeping, workdir) == {}
  changed = fashion_mnist.get_config()
  changed.update(learning_rate=0.05, seed=3)
  with pytest.raises(
    config_lib.ConfigError, match=r'learning_rate: 0.04 -> 0.05; seed: 0 -> 3\). Resuming'
  ):
    config_lib.check_rerun(changed, workdir)
  assert config_lib.check_rerun(changed, workdir, allow_change=True) == {
    'learning_rate': (0.04, 0.05),
    'seed': (0, 3),
  }
  other_shape = fashion_mnist.get_config()
  other_shape.num_classes = 20
  with pytest.raises(config_lib.ConfigError, match='other parameter shapes'):
    config_lib.check_rerun(other_shape, workdir, allow_change=True)
  other_model = fashion_mnist.get_config()
  other_model.model = 'alexnet_owt'
  with pytest.raises(
    config_lib.ConfigError, match=r"other parameter shapes \(model: 'alexnet' -> 'alexnet_owt'\)"
  ):
    config_lib.check_rerun(other_model, workdir, allow_change=True)


# Keys that configs/default.py did not have before 2026-12-04 (commit 904ac60's parent).
ADDED_SINCE = ('model', 'optimizer', 'lars_trust_coefficient', 'lr_reference_batch')
ADDED_SINCE += ('lr_poly_power', 'grad_accum_steps')


def test_a_run_saved_before_the_newer_keys_resumes_as_it_trained(tmp_path):
  """config.json files written before those keys existed evaluate as 'alexnet' and
  resume without a changed config (paper SGD, one micro-batch); another value of one
  of them is still a change."""
  config = fashion_mnist.get_config()
  older = {key: value for key, value in config.to_dict().items() if key not in ADDED_SINCE}
  (tmp_path / config_lib.CONFIG_FILE).write_text(json.dumps(older))
  saved = config_lib.load(str(tmp_path))
  assert (saved.model, saved.optimizer, saved.grad_accum_steps) == ('alexnet', 'sgd', 1)
  assert config_lib.check_rerun(config, str(tmp_path)) == {}
  config.optimizer = 'lars'
  with pytest.raises(config_lib.ConfigError, match="optimizer: 'sgd' -> 'lars'"):
    config_lib.check_rerun(config, str(tmp_path))


def test_config_for_a_workdir(tmp_path):
  workdir = str(tmp_path)
  with pytest.raises(config_lib.ConfigError, match='pass --config'):
    config_lib.for_workdir(workdir, None)
  config_lib.save(fashion_mnist.get_config(), workdir)
  saved = config_lib.for_workdir(workdir, None, {'eval_crops': 10, 'mesh.model': 1})
  assert saved.eval_crops == 10 and saved.mesh.model == 1 and saved.num_classes == 10
  given = imagenet.get_config()  # 1000 classes at 227 px: not this run's shapes.
  with pytest.raises(config_lib.ConfigError, match=r'num_classes: 10 -> 1000'):
    config_lib.for_workdir(workdir, given)


def test_eval_under_another_function_of_the_parameters_is_refused_naming_the_keys(tmp_path):
  """LRN, resize and normalisation change what a checkpoint computes: a --config or an
  override that changes them is refused unless allowed; the run's own keys pass."""
  workdir = str(tmp_path)
  trained = fashion_mnist.get_config()
  trained.mesh.model = 2
  config_lib.save(trained, workdir)
  other = fashion_mnist.get_config()
  other.update(lrn='caffe', pixel_std=(2.0, 2.0, 2.0), eval_crops=2)
  with pytest.raises(
    config_lib.ConfigError,
    match=r"lrn: 'cuda-convnet' -> 'caffe'; pixel_std: \(90.02, 90.02, 90.02\) -> \(2.0, 2.0, 2.0\)\)",
  ):
    config_lib.for_workdir(workdir, other)
  assert config_lib.for_workdir(workdir, other, allow_change=True) is other
  for key, value in (('resize', 'square'), ('resize_size', 80), ('pixel_mean', (0.0, 0.0, 0.0))):
    with pytest.raises(config_lib.ConfigError, match=rf'\({key}: '):
      config_lib.for_workdir(workdir, None, {key: value})
  # The mesh is the machine's: the run's mesh.model=2 is not kept, unless asked for.
  assert config_lib.for_workdir(workdir, None, {}).mesh.model is None
  assert config_lib.for_workdir(workdir, None, {'mesh.model': 2}).mesh.model == 2
