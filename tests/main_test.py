"""Tests of the command line, run as a user would run it (separate processes)."""

import os
import re
import signal
import time

import pytest

from alexnet_jax import config_lib
from alexnet_jax import main
from configs import fashion_mnist
from helpers import TIMEOUT
from helpers import folder_flags
from helpers import logged_train_rows
from helpers import on_devices
from helpers import processes
from helpers import run_module
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


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_75_then_the_rerun_finishes(
  toy_image_folder, tmp_path, monkeypatch, caplog
):
  """main's own SIGTERM handler (one process): the current step is checkpointed, the
  exit status is 75 (EX_TEMPFAIL: launch/sweep.py's SLURM script requeues), and a rerun
  resumes and finishes (here in this process; multiprocess_test reruns the command)."""
  workdir = tmp_path / 'run'
  args = [f'--workdir={workdir}', '--noplots', *folder_flags(toy_image_folder, num_train_steps=12)]
  log_dir = tmp_path / 'logs'
  os.makedirs(log_dir)
  log = log_dir / 'process0.log'
  with processes(1, 1, args, log_dir) as [trainer]:
    deadline = time.time() + TIMEOUT
    while '] [2] ' not in log.read_text():
      assert time.time() < deadline and trainer.poll() is None, log.read_text()[-3000:]
      time.sleep(0.2)
    trainer.send_signal(signal.SIGTERM)
    assert wait_all([trainer]) == [os.EX_TEMPFAIL], log.read_text()[-3000:]
  stopped = int(re.search(r'Stopped on request \(SIGTERM\) after step (\d+)', log.read_text())[1])
  assert stopped < 12 and str(stopped) in os.listdir(workdir / 'checkpoints')
  assert not (workdir / 'results.json').exists()

  on_devices(monkeypatch, 1)
  caplog.set_level('INFO')
  config = config_lib.for_workdir(str(workdir), None, {})
  results = main.train_and_plot(config, str(workdir), draw=False)
  assert f'Resumed from step {stopped}' in caplog.text
  assert results['step'] == 12
  logged = [row['step'] for row in logged_train_rows(workdir)]
  assert logged == list(range(1, 13))  # Each step once: nothing lost or repeated.


@pytest.mark.slow
def test_sigterm_is_honoured_while_waiting_for_data(tmp_path):
  """A train split that stalls (a FIFO named .png: reading it blocks inside tf.data's
  C++ iterator, as a hung file system would): SIGTERM still stops the run, exit 75."""
  root = tmp_path / 'data'
  write_image_folder(str(root))
  os.mkfifo(root / 'train' / sorted(os.listdir(root / 'train'))[0] / 'stalled.png')
  args = [f'--workdir={tmp_path / "run"}', '--noplots', *folder_flags(str(root))]
  log = tmp_path / 'logs' / 'process0.log'
  os.makedirs(log.parent)
  with processes(1, 1, args, log.parent) as [trainer]:
    deadline = time.time() + TIMEOUT
    while 'Batch: global' not in log.read_text():
      assert time.time() < deadline and trainer.poll() is None, log.read_text()[-3000:]
      time.sleep(0.2)
    time.sleep(2)  # Waiting for the first batch (a shuffle buffer of the whole split).
    trainer.send_signal(signal.SIGTERM)
    assert wait_all([trainer], timeout=60) == [os.EX_TEMPFAIL], log.read_text()[-3000:]
  assert (
    'Stopped on request (SIGTERM) while waiting for the batch of step 1; no step was trained'
    in log.read_text()
  )
