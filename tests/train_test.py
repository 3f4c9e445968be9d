"""Tests of the training loop on mock data: resume, results, NaN guards, config changes."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from alexnet_jax import checkpoints
from alexnet_jax import config_lib
from alexnet_jax import evaluate
from alexnet_jax import main
from alexnet_jax import plots
from alexnet_jax import steps
from alexnet_jax import train
from helpers import REPO
from helpers import TIMEOUT
from helpers import logged_train_rows
from helpers import mesh_of
from helpers import on_devices
from helpers import tensorboard_steps
from helpers import small_config as base_config
from helpers import use_fashion_mnist_as_is


pytestmark = pytest.mark.usefixtures('fashion_mnist_as_is', 'one_device')


def small_config(**overrides):
  return base_config(eval_batch_size=12, **overrides)  # 64 test examples: padded.


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def restore_params(workdir, step):
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')) as manager:
    return manager.restore(step)['params']


def saved_steps(workdir):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')))


# The run that the tests marked `uses_trained` read (never change) instead of training
# their own: 12 steps, evaluated at step 6 (1 crop) and 12 (eval_crops=2).
TRAINED_CONFIG = {'num_train_steps': 12, 'eval_every_steps': 6, 'eval_crops': 2}
uses_trained = pytest.mark.xdist_group('train_test_trained')  # Trained once per module.


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(workdir, results) of one run of small_config(**TRAINED_CONFIG); checkpoints at
  steps 1, 3, 6, 9 and 12."""
  workdir = str(tmp_path_factory.mktemp('trained'))
  with pytest.MonkeyPatch.context() as monkeypatch:
    use_fashion_mnist_as_is(monkeypatch)
    on_devices(monkeypatch, 1)
    with tfds.testing.mock_data(num_examples=64):
      results = train.train_and_evaluate(small_config(**TRAINED_CONFIG), workdir)
  return workdir, results


@pytest.mark.slow
@uses_trained
def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path, trained):
  """Killed after step 9 (epoch 1 of 8 steps, plus one): the resumed run builds epoch 1
  directly, skips its first step's examples, and continues bit for bit; its metrics
  log drops what the killed run had logged after the checkpoint."""
  config = small_config(**TRAINED_CONFIG)
  full, results = trained
  resumed = str(tmp_path / 'resumed')
  with tfds.testing.mock_data(num_examples=64):
    shutil.copytree(
      os.path.join(full, 'checkpoints', '9'), os.path.join(resumed, 'checkpoints', '9')
    )
    shutil.copy(os.path.join(full, 'metrics.jsonl'), resumed)  # Logged up to step 12.
    with open(os.path.join(resumed, 'metrics.jsonl'), 'a') as f:
      f.write('{"step": 13, "train_lo')  # A line cut short by kill -9.
    resumed_results = train.train_and_evaluate(config, resumed)

  assert results['step'] == resumed_results['step'] == 12
  assert results['n_test_examples'] == 64
  for key in ('test_top1', 'test_top5', 'test_loss'):
    assert results[key] == pytest.approx(resumed_results[key], rel=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
    restore_params(full, 12),
    restore_params(resumed, 12),
  )
  full_rows, resumed_rows = logged_train_rows(full), logged_train_rows(resumed)
  assert [r['step'] for r in resumed_rows] == list(range(1, 13))  # Each step once.
  for a, b in zip(full_rows, resumed_rows, strict=True):
    assert a['train_loss'] == pytest.approx(b['train_loss'], rel=1e-6)

  # Run once more, a finished run trains nothing and reports the same test metrics.
  with tfds.testing.mock_data(num_examples=64):
    again = train.train_and_evaluate(config, resumed)
  assert again['step'] == 12
  # What only training measured stays.
  assert again['train_images_per_sec'] == resumed_results['train_images_per_sec'] > 0
  assert again['wall_seconds'] == resumed_results['wall_seconds']
  assert again['n_test_examples'] == resumed_results['n_test_examples']
  assert again['test_loss'] == pytest.approx(resumed_results['test_loss'], rel=1e-6)
  assert again['test_top1'] == resumed_results['test_top1']
  assert [r['step'] for r in logged_train_rows(resumed)] == list(range(1, 13))


@pytest.mark.slow
@uses_trained
def test_evaluations_along_the_way_take_the_central_patch_and_the_last_eval_crops(
  tmp_path, trained
):
  """Each checkpoint evaluated on its own (`evaluate_checkpoint`, the --mode=eval path)
  gives what the loop logged: step 6 with 1 crop, the last step with eval_crops=2."""
  workdir, results = trained
  # Its eval_N.json files go to a workdir of their own: `trained` stays as trained.
  os.symlink(os.path.join(workdir, 'checkpoints'), tmp_path / 'checkpoints')
  with tfds.testing.mock_data(num_examples=64):
    central, mirrored_6, mirrored = (
      evaluate.evaluate_checkpoint(
        small_config(**{**TRAINED_CONFIG, 'eval_crops': crops}), str(tmp_path), step=step
      )
      for crops, step in ((1, 6), (2, 6), (2, 12))
    )
  test_rows = [r for r in read_metrics(workdir) if 'test_loss' in r]
  assert [(r['step'], r['test_crops']) for r in test_rows] == [(6, 1), (12, 2)]
  assert test_rows[0]['test_loss'] == pytest.approx(central['loss'], rel=1e-6)
  assert test_rows[1]['test_loss'] == pytest.approx(mirrored['loss'], rel=1e-6)
  assert results['test_loss'] == test_rows[1]['test_loss']
  # The two tests differ, so the first row's match is not a coincidence.
  assert central['loss'] != pytest.approx(mirrored_6['loss'], rel=1e-6)


@pytest.mark.slow
def test_results_survive_a_plotting_error(tmp_path, monkeypatch, caplog):
  def broken(*unused_args):
    raise RuntimeError('no display')

  monkeypatch.setattr(plots, 'write_all', broken)
  with tfds.testing.mock_data(num_examples=64):
    returned = main.train_and_plot(small_config(num_train_steps=2), str(tmp_path))
  with open(tmp_path / 'results.json') as f:
    results = json.load(f)
  assert results == returned
  assert results['step'] == 2 and results['n_test_examples'] == 64
  [last_test] = [r for r in read_metrics(tmp_path) if 'test_loss' in r]
  assert results['test_loss'] == last_test['test_loss']
  assert results['test_top1'] == last_test['test_top1']
  assert 'Could not write the plots' in caplog.text


@pytest.mark.slow
def test_non_finite_gradients_stop_the_run_before_anything_is_saved(tmp_path, monkeypatch):
  """Dropout 1 keeps the loss finite (every fc7 output is 0) while the gradients are
  NaN (0 · x / 0): the gradients' check is what catches it. No checkpoint thread is
  left running, and the metric writer is closed."""
  closed = []
  _recording_closes(monkeypatch, closed)
  with tfds.testing.mock_data(num_examples=64):
    with pytest.raises(
      FloatingPointError,
      match=r'Step 1 is not finite \(train loss [\d.]+, but NaN or Inf gradients\)'
      r'.*dropout_rate=1.0',
    ):
      train.train_and_evaluate(small_config(dropout_rate=1.0), str(tmp_path))
  assert closed == ['metrics', 'checkpoints']
  assert saved_steps(tmp_path) == []
  assert not (tmp_path / 'results.json').exists()


@pytest.mark.slow
def test_finite_steps_that_leave_inf_parameters_are_never_saved(tmp_path):
  """Step 1's loss and gradients are finite; its update is not (biases step at 2 ×
  3e38, more than float32 holds): the check of the parameters before saving stops it."""
  config = small_config(learning_rate=3e38, lr_schedule='constant', warmup_steps=0)
  config.num_train_steps = 1
  with tfds.testing.mock_data(num_examples=64):
    with pytest.raises(
      FloatingPointError,
      match=r'Step 1 is not finite \(finite loss and gradients, but NaN or Inf parameters',
    ):
      train.train_and_evaluate(config, str(tmp_path))
  assert saved_steps(tmp_path) == []
  assert not (tmp_path / 'results.json').exists()


@pytest.mark.slow
def test_divergence_keeps_the_last_good_checkpoint_and_a_rerun_resumes_from_it(tmp_path):
  config = small_config()
  workdir = str(tmp_path)
  with tfds.testing.mock_data(num_examples=64):
    train.train_and_evaluate(small_config(num_train_steps=3), workdir, allow_config_change=True)
    assert saved_steps(workdir) == [1, 3]
    # Step 4's update (lr 1e30) leaves huge but finite weights; step 5 overflows.
    with pytest.raises(FloatingPointError, match=r'Step 5 is not finite.*learning_rate=1e\+30'):
      train.train_and_evaluate(
        small_config(learning_rate=1e30, lr_schedule='constant'), workdir, allow_config_change=True
      )
    assert saved_steps(workdir) == [1, 3]
    jax.tree.map(
      lambda x: np.testing.assert_array_equal(np.isfinite(x), True), restore_params(workdir, 3)
    )
    results = train.train_and_evaluate(config, workdir, allow_config_change=True)
  assert results['step'] == 6 and np.isfinite(results['test_loss'])
  with open(tmp_path / 'config_changes.jsonl') as f:
    changes = [json.loads(line) for line in f]
  assert [c['from_step'] for c in changes] == [3, 3]
  assert changes[0]['changes']['learning_rate'] == [0.04, 1e30]


def test_a_non_finite_step_names_the_rate_it_used_when_scaled_to_the_batch():
  config = small_config(learning_rate=0.04, batch_size=4096, lr_reference_batch=128)
  message = str(train._nonfinite_error(8, 'train loss nan', config, '/ckpt'))
  assert (
    'config.learning_rate=0.04 x batch_size 4096 / lr_reference_batch 128 = 1.28; try a smaller one'
  ) in message, message


def test_itstime_every_n_steps_and_at_the_last():
  assert [s for s in range(1, 11) if train.itstime(s, 4, 10)] == [4, 8, 10]


def test_chrono_leaves_out_compilation_and_evaluation(monkeypatch):
  clock = iter(
    [
      0.0,  # Created.
      10.0,  # First window: 2 steps, compilation included.
      12.0,
      13.0,  # Evaluation, paused.
      15.0,  # Second window: 2 steps, 4 s of which 1 s was evaluation.
      16.0,
    ]
  )  # Third: 1 step in 1 s.
  monkeypatch.setattr(train.time, 'perf_counter', lambda: next(clock))
  chrono = train.Chrono(images_per_step=8)
  assert chrono.images_per_sec is None
  assert chrono.window(2) == pytest.approx(16 / 10)
  assert chrono.images_per_sec is None  # The first window does not count.
  with chrono.paused():
    pass
  assert chrono.window(2) == pytest.approx(16 / 4)
  assert chrono.window(1) == pytest.approx(8 / 1)
  assert chrono.images_per_sec == pytest.approx(24 / 5)


def _recording_closes(monkeypatch, closed: list[str]):
  """Makes the loop's CheckpointManager and metric writer append their name to
  `closed` when closed."""
  from clu import metric_writers  # pylint: disable=g-import-not-at-top

  def recorded(create, name):
    def wrapper(*args, **kwargs):
      resource = create(*args, **kwargs)
      close = resource.close
      resource.close = lambda: (closed.append(name), close())[1]
      return resource

    return wrapper

  monkeypatch.setattr(
    checkpoints, 'create_manager', recorded(checkpoints.create_manager, 'checkpoints')
  )
  monkeypatch.setattr(
    metric_writers,
    'create_default_writer',
    recorded(metric_writers.create_default_writer, 'metrics'),
  )


@pytest.mark.slow
def test_a_nan_or_a_preemption_closes_the_checkpoints_and_the_metric_writer(tmp_path, monkeypatch):
  """No checkpoint thread is left running, and TensorBoard has every logged step. (The
  NaN: test_non_finite_gradients_stop_the_run_before_anything_is_saved.)"""
  closed = []
  _recording_closes(monkeypatch, closed)
  with tfds.testing.mock_data(num_examples=64):
    jit_train_step = train.steps_lib.jit_train_step

    def stop_after_the_first_step(*args):  # As a SIGTERM during step 1 would.
      step = jit_train_step(*args)

      def stepped(*step_args):
        train.request_stop()
        return step(*step_args)

      return stepped

    monkeypatch.setattr(train.steps_lib, 'jit_train_step', stop_after_the_first_step)
    try:
      with pytest.raises(train.Preempted, match='after step 1'):
        train.train_and_evaluate(small_config(), str(tmp_path / 'preempted'))
    finally:
      train._STOP.clear()  # pylint: disable=protected-access
  assert closed == ['metrics', 'checkpoints']
  assert tensorboard_steps(tmp_path / 'preempted', 'train_loss') == [1]


_REWRITE_WITH_A_FILE_SIZE_LIMIT = """
import resource, signal, sys
from alexnet_jax import train
# A write past the limit fails (EFBIG) where it stands, as a kill would stop it.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (150, 150))
train._MetricsLog(sys.argv[1], resume_step=4)
"""


@pytest.mark.slow
def test_a_resume_that_dies_while_rewriting_the_metrics_keeps_every_line(tmp_path):
  """A resume drops the lines after its checkpoint by rewriting metrics.jsonl; dying
  half-way through that write (here: at 150 bytes) must not cost the run's history."""
  path = tmp_path / 'metrics.jsonl'
  lines = [
    json.dumps({'step': step, 'train_loss': 2.0 / step, 'epoch': step / 8}) for step in range(1, 7)
  ]
  path.write_text(''.join(line + '\n' for line in lines))
  assert len(''.join(lines[:4])) > 150
  result = subprocess.run(
    [sys.executable, '-c', _REWRITE_WITH_A_FILE_SIZE_LIMIT, str(path)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=TIMEOUT,
    check=False,
  )
  assert result.returncode != 0 and 'File too large' in result.stderr, result.stderr[-2000:]
  kept = path.read_text().splitlines()
  assert kept[:4] == lines[:4]  # The old file whole (or the new one), never half of it.
  assert sorted(os.listdir(tmp_path)) == ['metrics.jsonl']  # No temporary file left.


def layer_arrays(params, layer):
  return [np.asarray(params[layer][kind]) for kind in ('kernel', 'bias')]


@pytest.mark.slow
@uses_trained
def test_a_run_starts_from_another_by_layer_name_and_a_frozen_layer_never_moves(tmp_path, trained):
  """init_from copies every layer bit for bit but those to reinitialise (`reinit`, or
  fc8 for another class count); factor 0 keeps conv1-5 exactly the source's while
  fc6-8 train; a resume reads its own checkpoint, not the source's."""
  source, target = trained[0], str(tmp_path / 'target')
  source_params = restore_params(source, 12)  # Trained: every layer moved from its init.
  with tfds.testing.mock_data(num_examples=64):
    config = small_config(
      num_train_steps=3,
      init_from=source,
      reinit=('fc8',),
      lr_multipliers=(('conv[1-5]', 0.0),),
    )
    initial = steps.init_params(config, jax.random.split(jax.random.key(config.seed))[0])
    started, source_step = checkpoints.init_from(config, initial, mesh_of(1, 1))
    train.train_and_evaluate(config, target)
    # The source's latest step is kept (the source may train on); a rerun that leaves
    # init_from_step at None (its latest) is the same run, not a changed config.
    assert source_step == 12 and config_lib.load(target).init_from_step == 12
    assert config.init_from_step is None
    assert train.train_and_evaluate(config, target)['step'] == 3
  for layer in ('conv1', 'conv2', 'conv3', 'conv4', 'conv5', 'fc6', 'fc7'):
    for a, b in zip(layer_arrays(started, layer), layer_arrays(source_params, layer), strict=True):
      np.testing.assert_array_equal(a, b)
  for a, b, c in zip(
    *(layer_arrays(p, 'fc8') for p in (started, initial, source_params)), strict=True
  ):
    np.testing.assert_array_equal(a, b)  # Its own init, not the source's.
    assert not np.array_equal(a, c)
  trained = restore_params(target, 3)
  for layer in ('conv1', 'conv2', 'conv3', 'conv4', 'conv5'):  # Frozen.
    for a, b in zip(layer_arrays(trained, layer), layer_arrays(source_params, layer), strict=True):
      np.testing.assert_array_equal(a, b)
  for layer in ('fc6', 'fc7', 'fc8'):
    assert not np.array_equal(layer_arrays(trained, layer)[0], layer_arrays(started, layer)[0])


@pytest.mark.slow
@uses_trained
def test_init_from_refuses_what_it_cannot_use_naming_the_key(tmp_path, trained):
  source = trained[0]
  mesh = mesh_of(1, 1)
  params = steps.init_params(small_config(), jax.random.key(0))
  cases = [
    ({'init_from': str(tmp_path / 'none')}, r"config.init_from='.*none': no training run"),
    (
      {'init_from': source, 'init_from_step': 7},
      r'config.init_from_step=7: .* steps \[1, 3, 6, 9, 12\]',
    ),
    ({'init_from': source, 'lrn': 'caffe'}, r"lrn \('cuda-convnet' there, 'caffe' here\)"),
  ]
  for overrides, message in cases:
    with pytest.raises(config_lib.ConfigError, match=message):
      checkpoints.init_from(small_config(**overrides), params, mesh)
  # Allowed on purpose, a change passes the key check; a shape change still names the layer.
  bigger = small_config(init_from=source, image_size=99, resize_size=99)  # pool5 2×2.
  bigger.init_from_allowed_changes = ('image_size', 'resize_size')
  with pytest.raises(
    config_lib.ConfigError, match=r'fc6/kernel is \(256, 4096\) there and \(1024, 4096\) here'
  ):
    checkpoints.init_from(bigger, steps.init_params(bigger, jax.random.key(0)), mesh)
  # Another class count: fc8 starts anew without being listed.
  other = small_config(init_from=source, num_classes=5)
  started, _ = checkpoints.init_from(other, steps.init_params(other, jax.random.key(0)), mesh)
  assert started['fc8']['kernel'].shape == (4096, 5)
