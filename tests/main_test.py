"""Tests of the command line, run as a user would run it."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args):
  return subprocess.run([sys.executable, '-m', 'alexnet_jax.main', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600, check=False)


def test_misspelt_config_key_names_the_valid_ones():
  result = run_main('--config=configs/fashion_mnist.py', '--config.batch_sise=64')
  assert result.returncode != 0
  assert "Unknown config key 'batch_sise'" in result.stderr
  assert 'Did you mean batch_size' in result.stderr
  assert 'augment.pca_lighting_stddev' in result.stderr  # The list of valid keys.


def test_main_trains_and_evaluates_on_real_fashion_mnist(tmp_path):
  workdir = tmp_path / 'run'
  result = run_main('--config=configs/fashion_mnist.py', f'--workdir={workdir}',
                    f'--config.data_dir={tmp_path / "tfds"}',
                    '--config.num_train_steps=3', '--config.eval_batch_size=1000')
  assert result.returncode == 0, result.stderr[-3000:]
  with open(workdir / 'results.json') as f:
    results = json.load(f)
  assert results['step'] == 3 and results['n_test_examples'] == 10_000
  assert os.listdir(workdir / 'checkpoints') == ['3']
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(workdir))
