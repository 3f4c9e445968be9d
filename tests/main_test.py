"""Tests of the command line, run as a user would run it."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, devices=1):
  env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
  return subprocess.run([sys.executable, '-m', 'alexnet_jax.main', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600, check=False)


def test_misspelt_config_key_names_the_valid_ones():
  result = run_main('--config=configs/fashion_mnist.py', '--config.batch_sise=64')
  assert result.returncode == 1
  assert "Unknown config key 'batch_sise'" in result.stderr
  assert 'Did you mean batch_size' in result.stderr
  assert 'augment.pca_lighting_stddev' in result.stderr  # The list of valid keys.


def test_main_trains_real_fashion_mnist_with_towers_on_two_devices(tmp_path):
  workdir = tmp_path / 'run'
  result = run_main('--config=configs/fashion_mnist.py', f'--workdir={workdir}',
                    f'--config.data_dir={tmp_path / "tfds"}', '--config.mesh.model=2',
                    '--config.num_train_steps=3', '--config.eval_batch_size=1000',
                    devices=2)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "mesh {'data': 1, 'model': 2}" in result.stderr
  with open(workdir / 'results.json') as f:
    results = json.load(f)
  assert results['step'] == 3 and results['n_test_examples'] == 10_000
  assert '3' in os.listdir(workdir / 'checkpoints')  # The final step is always saved.
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(workdir))


def test_eval_mode_without_a_checkpoint_says_what_to_do(tmp_path):
  result = run_main('--config=configs/fashion_mnist.py', f'--workdir={tmp_path / "none"}',
                    '--mode=eval')
  assert result.returncode != 0
  assert 'FileNotFoundError: No checkpoint in' in result.stderr
  assert 'train first' in result.stderr
