"""Tests of the command line, run as a user would run it (separate processes)."""

import os
import signal
import time

import pytest
import tensorflow_datasets as tfds

from alexnet_jax import config_lib
from alexnet_jax import main
from configs import fashion_mnist
from helpers import TIMEOUT
from helpers import folder_flags
from helpers import logged_train_rows
from helpers import processes
from helpers import run_module
from helpers import tensorboard_steps
from helpers import wait_all
from helpers import write_image_folder


def run_main(*args, devices=1):
  return run_module(
    'alexnet_jax.main', *args, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}'
  )


def last_line(text: str) -> str:
  return text.strip().splitlines()[-1]


@pytest.mark.slow
def test_misspelt_config_key_names_the_valid_ones():
  result = run_main('--config=configs/fashion_mnist.py', '--config.batch_sise=64')
  assert result.returncode == 1
  assert "Unknown config key 'batch_sise'" in result.stderr
  assert 'Did you mean batch_size' in result.stderr
  assert 'augment.pca_lighting_stddev' in result.stderr  # The list of valid keys.


@pytest.mark.parametrize(
  'flag, message',
  [
    ('--mode=trian', 'flag --mode=trian: value should be one of <train|eval>'),
    ('--workdri=runs/x', "Unknown command line flag 'workdri'. Did you mean: workdir ?"),
  ],
)
def test_a_bad_flag_is_named_in_one_line(flag, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    main.parse_flags(['main', flag])
  assert exit_info.value.code == 1
  assert capsys.readouterr().err == f'FATAL Flags parsing error: {message}\n'


@pytest.mark.slow
def test_bad_values_stop_before_any_data_with_the_key_as_last_line(tmp_path):
  result = run_main(f'--workdir={tmp_path / "run"}', '--config.dropout_rate=1.0')
  assert result.returncode == 1
  assert last_line(result.stderr) == (
    'ConfigError: config.dropout_rate=1.0: must be a number in [0, 1).'
  )
  assert not (tmp_path / 'run').exists()  # Nothing was started.
  (tmp_path / 'file').write_text('')
  result = run_main(f'--workdir={tmp_path / "file"}')
  assert result.returncode == 1
  assert last_line(result.stderr) == (
    f'ConfigError: --workdir={tmp_path / "file"} exists and is not a directory: pass a '
    'directory (it is created if missing).'
  )


@pytest.mark.slow
def test_eval_mode_without_a_checkpoint_says_what_to_do(tmp_path):
  result = run_main(
    '--config=configs/fashion_mnist.py', f'--workdir={tmp_path / "none"}', '--mode=eval'
  )
  assert result.returncode != 0
  assert last_line(result.stderr).startswith('FileNotFoundError: No checkpoint in')
  assert 'train first' in result.stderr

  # A --config with other parameter shapes than the run's is refused before any restore.
  os.makedirs(tmp_path / 'run')
  config_lib.save(fashion_mnist.get_config(), str(tmp_path / 'run'))
  result = run_main('--config=configs/imagenet.py', f'--workdir={tmp_path / "run"}', '--mode=eval')
  assert result.returncode == 1
  assert last_line(result.stderr).startswith(
    f'ConfigError: The run in {tmp_path / "run"} has other parameter shapes (image_size: 67 -> 227; num_classes: 10 -> 1000)'
  )


def stored_order(root) -> list[str]:
  """The paths of an image folder's train split in the order TFDS stores them."""
  builder = tfds.ImageFolder(str(root))
  ds = builder.as_dataset(split='train', decoders={'image': tfds.decode.SkipDecoding()})
  return [ex['image/filename'].decode() for ex in tfds.as_numpy(ds)]


@pytest.mark.slow
def test_a_stop_while_waiting_for_data_exits_at_once_keeping_every_record(tmp_path):
  """A train file that stalls (a FIFO named .png: reading it blocks inside tf.data's C++
  iterator, as a hung file system would): SIGTERM while the loop waits for the next
  batch exits 75 within 10 s (SLURM sends SIGKILL 30 s after SIGTERM), with the steps
  trained, if any, checkpointed and every one of them in metrics.jsonl and in the
  TensorBoard events. (Where in the split the stall stops the stream depends on how far
  the decode chunks read ahead, `input_pipeline._map_decodable`.)"""
  root, workdir = tmp_path / 'data', tmp_path / 'run'
  write_image_folder(str(root))
  stalled = stored_order(root)[60]
  os.remove(stalled)
  os.mkfifo(stalled)  # Same name: the same stored order.
  flags = folder_flags(
    str(root),
    shuffle_buffer=8,
    num_train_steps=40,
    eval_every_steps=100,
    checkpoint_every_steps=100,
  )
  args = [f'--workdir={workdir}', '--noplots', *flags]
  log = tmp_path / 'logs' / 'process0.log'
  os.makedirs(log.parent)
  metrics = workdir / 'metrics.jsonl'
  with processes(1, 1, args, log.parent) as [trainer]:
    # Waiting for data: the loop has started and no new step came for 10 s.
    deadline, last, since = time.time() + TIMEOUT, None, time.time()
    while 'Batch: global' not in log.read_text() or time.time() - since < 10:
      assert time.time() < deadline and trainer.poll() is None, log.read_text()[-3000:]
      size = metrics.stat().st_size if metrics.exists() else None
      if size != last:
        last, since = size, time.time()
      time.sleep(0.2)
    trainer.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert wait_all([trainer], timeout=60) == [os.EX_TEMPFAIL], log.read_text()[-3000:]
    assert time.monotonic() - signalled < 10, log.read_text()[-3000:]
  trained = [row['step'] for row in logged_train_rows(workdir)] if metrics.exists() else []
  stopped = trained[-1] if trained else 0
  assert stopped < 40 and trained == list(range(1, stopped + 1))
  done = f'steps up to {stopped} are checkpointed' if stopped else 'no step was trained'
  assert (
    f'Stopped on request (SIGTERM) while waiting for the batch of step {stopped + 1}; {done}'
    in log.read_text()
  )
  if stopped:
    assert str(stopped) in os.listdir(workdir / 'checkpoints')
  assert tensorboard_steps(workdir, 'train_loss') == trained
