"""Tests of the sweep launcher, SLURM script, preemption, results table and experiment scripts."""

import json
import os
import shlex
import subprocess
import sys

import matplotlib.image
import pytest

from configs import fashion_mnist
from launch import results
from launch import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST = os.path.join(REPO, 'configs', 'fashion_mnist.py')


def test_product_crosses_the_axes_last_fastest():
  assert sweep.product(learning_rate=[0.1, 0.2], seed=[0, 1, 2]) == [
    {'learning_rate': 0.1, 'seed': 0},
    {'learning_rate': 0.1, 'seed': 1},
    {'learning_rate': 0.1, 'seed': 2},
    {'learning_rate': 0.2, 'seed': 0},
    {'learning_rate': 0.2, 'seed': 1},
    {'learning_rate': 0.2, 'seed': 2},
  ]


def test_zip_pairs_the_axes_and_rejects_unequal_lengths():
  assert sweep.zip_axes(learning_rate=[0.1, 0.2], warmup_steps=[10, 20]) == [
    {'learning_rate': 0.1, 'warmup_steps': 10},
    {'learning_rate': 0.2, 'warmup_steps': 20},
  ]
  with pytest.raises(ValueError, match='equal lengths'):
    sweep.zip_axes(learning_rate=[0.1, 0.2], seed=[0])


@pytest.mark.parametrize(
  'spec, expected',
  [
    ('config.learning_rate=[0.005,0.01,0.02]', ('learning_rate', [0.005, 0.01, 0.02])),
    ('seed=[0, 1]', ('seed', [0, 1])),
    ('config.lr_schedule=[step,cosine]', ('lr_schedule', ['step', 'cosine'])),
    ('lr_decay_epochs=[(10, 20), (30,)]', ('lr_decay_epochs', [(10, 20), (30,)])),
    ('config.augment.flip=[True,False]', ('augment.flip', [True, False])),
  ],
)
def test_parse_axis(spec, expected):
  assert sweep.parse_axis(spec) == expected


@pytest.mark.parametrize('spec', ['learning_rate', 'learning_rate=0.1', 'seed=(0,1)'])
def test_parse_axis_rejects_non_lists(spec):
  with pytest.raises(ValueError, match=r'KEY=\[V1,V2'):
    sweep.parse_axis(spec)


def test_runs_get_readable_unique_names_and_their_own_workdirs():
  runs = sweep.expand(
    sweep.product(learning_rate=[0.01, 0.02], seed=[1])
    + [{'lr_schedule': 'step', 'lr_decay_epochs': (1, 2)}],
    '/s/lr',
  )
  assert [r.name for r in runs] == [
    'learning_rate=0.01,seed=1',
    'learning_rate=0.02,seed=1',
    'lr_schedule=step,lr_decay_epochs=(1,2)',
  ]
  assert [r.workdir for r in runs] == [
    '/s/lr/learning_rate=0.01,seed=1',
    '/s/lr/learning_rate=0.02,seed=1',
    '/s/lr/lr_schedule=step,lr_decay_epochs=(1,2)',
  ]
  assert sweep.expand([{}], '/s')[0].name == 'base'
  with pytest.raises(ValueError, match='repeated'):
    sweep.expand([{'seed': 1}, {'seed': 1}], '/s')


def test_fashion_mnist_config_declares_a_learning_rate_sweep():
  assert sweep.config_sweep(FASHION_MNIST) == [
    {'learning_rate': 0.02},
    {'learning_rate': 0.04},
    {'learning_rate': 0.08},
  ]
  assert fashion_mnist.get_config().learning_rate == 0.04  # get_config() takes no arg.


def test_overrides_are_checked_against_the_config():
  config = fashion_mnist.get_config()
  config.lock()
  check = lambda overrides, passthrough={}: sweep.check_overrides(
    config, sweep.expand([overrides], '/s'), passthrough
  )
  check({'learning_rate': 0.1, 'augment.flip': False})
  with pytest.raises(KeyError, match='learning_rate'):
    check({'learning_rat': 0.1})
  with pytest.raises(TypeError, match='batch_size'):
    check({'batch_size': 0.5})
  with pytest.raises(ValueError, match='also set'):
    check({'seed': 1}, {'seed': 2})
  assert config.learning_rate == 0.04  # Checked on copies.


def test_command_passes_shared_then_own_overrides():
  run = sweep.expand([{'learning_rate': 0.01, 'lr_schedule': 'step'}], '/s')[0]
  assert sweep.command(
    run, '/r/configs/fashion_mnist.py', {'num_train_steps': 150}, python='py'
  ) == [
    'py',
    '-m',
    'alexnet_jax.main',
    '--config=/r/configs/fashion_mnist.py',
    '--workdir=/s/learning_rate=0.01,lr_schedule=step',
    '--config.num_train_steps=150',
    '--config.learning_rate=0.01',
    '--config.lr_schedule=step',
  ]


def launch_cli(*args):
  return subprocess.run(
    [sys.executable, '-m', 'launch.sweep', *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )


@pytest.mark.slow
def test_relaunch_skips_finished_runs(tmp_path):
  finished = tmp_path / 'learning_rate=0.04'
  finished.mkdir()
  (finished / 'results.json').write_text('{}')
  result = launch_cli(
    f'--config={FASHION_MNIST}',
    f'--workdir={tmp_path}',
    '--dry_run',
    '--config.num_train_steps=150',
  )
  assert result.returncode == 0, result.stderr[-2000:]
  out = result.stdout
  assert f'learning_rate=0.04: finished, {finished}' in out
  commands = [line for line in out.splitlines() if 'alexnet_jax.main' in line]
  assert len(commands) == 2
  for lr, command in zip(('0.02', '0.08'), commands, strict=True):
    assert f'--workdir={tmp_path}/learning_rate={lr}' in command
    assert command.endswith(f'--config.num_train_steps=150 --config.learning_rate={lr}')
  assert not (tmp_path / 'learning_rate=0.02').exists()  # A dry run writes nothing.


@pytest.mark.slow
def test_command_line_axes_replace_the_config_sweep(tmp_path):
  result = launch_cli(
    f'--config={FASHION_MNIST}',
    f'--workdir={tmp_path}',
    '--dry_run',
    '--sweep=config.learning_rate=[0.005,0.01]',
    '--sweep=config.seed=[0,1]',
  )
  assert result.returncode == 0, result.stderr[-2000:]
  names = [line.split(':')[0] for line in result.stdout.splitlines() if ': to run' in line]
  assert names == [
    'learning_rate=0.005,seed=0',
    'learning_rate=0.005,seed=1',
    'learning_rate=0.01,seed=0',
    'learning_rate=0.01,seed=1',
  ]


@pytest.mark.slow
def test_misspelt_axis_fails_before_launching(tmp_path):
  result = launch_cli(
    f'--config={FASHION_MNIST}', f'--workdir={tmp_path}', '--sweep=config.learning_rat=[0.1]'
  )
  assert result.returncode != 0
  assert 'Did you mean "learning_rate"' in result.stderr
  assert not os.listdir(tmp_path)


def test_run_local_runs_every_command_and_logs_to_files(tmp_path):
  runs = sweep.expand([{'seed': s} for s in range(3)], str(tmp_path))
  commands = [
    [sys.executable, '-c', f'import sys; print("run {i}"); sys.exit({i})'] for i in range(3)
  ]
  statuses = sweep.run_local(runs, commands, parallel=2)
  assert statuses == {'seed=0': 0, 'seed=1': 1, 'seed=2': 2}
  for i, run in enumerate(runs):
    with open(os.path.join(run.workdir, 'train.log')) as f:
      assert f.read() == f'run {i}\n'
    with open(os.path.join(run.workdir, 'overrides.json')) as f:
      assert json.load(f) == {'seed': i}


def slurm_runs(tmp_path, n):
  runs = sweep.expand([{'seed': s} for s in range(n)], str(tmp_path))
  return runs, [sweep.command(run, 'configs/fashion_mnist.py', {}) for run in runs]


def test_slurm_script_has_one_array_task_per_run(tmp_path):
  runs, commands = slurm_runs(tmp_path, 3)
  script = sweep.slurm_script(
    runs, commands, job_name='lr', log_dir='/logs', sbatch_options=['partition=gpu']
  )
  lines = script.splitlines()
  for option in (
    '--array=0-2',
    '--requeue',
    '--signal=B:TERM@120',
    '--nodes=1',
    '--gpus-per-node=1',
    '--output=/logs/%A_%a.out',
    '--partition=gpu',
  ):
    assert f'#SBATCH {option}' in lines, option
  for i, run in enumerate(runs):
    [case] = [line for line in lines if shlex.quote(f'--workdir={run.workdir}') + ' ' in line]
    assert case.strip().startswith(f'{i}) cmd=(') and 'alexnet_jax.main' in case
  assert 'srun --ntasks-per-node=1 "${cmd[@]}" &' in [line.strip() for line in lines]
  cpu_only = sweep.slurm_script(runs, commands, job_name='lr', log_dir='/l', gpus_per_node=0)
  assert 'gpus-per-node' not in cpu_only
  subprocess.run(['bash', '-n'], input=script, text=True, check=True)


def test_multi_node_slurm_script_starts_one_trainer_per_node(tmp_path):
  runs, commands = slurm_runs(tmp_path, 2)
  script = sweep.slurm_script(
    runs, commands, job_name='lr', log_dir='/logs', nodes=4, gpus_per_node=8
  )
  assert '#SBATCH --nodes=4' in script and '#SBATCH --gpus-per-node=8' in script
  assert '#SBATCH --ntasks-per-node=1' in script
  assert 'srun --ntasks-per-node=1 "${cmd[@]}" &' in [line.strip() for line in script.splitlines()]
  # The trainers join from SLURM's variables, not from an exported address alone.
  assert 'JAX_COORDINATOR_ADDRESS' not in script
  subprocess.run(['bash', '-n'], input=script, text=True, check=True)


@pytest.mark.slow
def test_slurm_backend_writes_the_script_for_the_unfinished_runs(tmp_path):
  (tmp_path / 'learning_rate=0.02').mkdir()
  (tmp_path / 'learning_rate=0.02' / 'results.json').write_text('{}')
  env = {**os.environ, 'PATH': os.path.dirname(sys.executable)}  # No sbatch on it.
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'launch.sweep',
      f'--config={FASHION_MNIST}',
      f'--workdir={tmp_path}',
      '--backend=slurm',
      '--sbatch=partition=gpu',
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  script = tmp_path / 'sweep.sbatch'
  assert f'wrote {script}' in result.stdout
  text = script.read_text()
  assert '#SBATCH --array=0-1' in text and '#SBATCH --partition=gpu' in text
  assert 'learning_rate=0.02' not in text
  for lr in ('0.04', '0.08'):
    with open(tmp_path / f'learning_rate={lr}' / 'overrides.json') as f:
      assert json.load(f) == {'learning_rate': float(lr)}


def write_run(workdir, overrides, test_top1s, finished=True):
  os.makedirs(workdir)
  with open(os.path.join(workdir, 'overrides.json'), 'w') as f:
    json.dump(overrides, f)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    for i, top1 in enumerate(test_top1s, 1):
      f.write(json.dumps({'step': 50 * i, 'epoch': i / 10, 'train_loss': 1.0}) + '\n')
      f.write(
        json.dumps(
          {
            'step': 50 * i,
            'epoch': i / 10,
            'test_loss': 1 - top1,
            'test_top1': top1,
            'test_top5': 0.99,
          }
        )
        + '\n'
      )
  if finished:
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(
        {
          'step': 50 * len(test_top1s),
          'epoch': 0.3,
          'test_top1': test_top1s[-1],
          'test_top5': 0.99,
          'test_loss': 1 - test_top1s[-1],
          'n_test_examples': 10_000,
          'train_images_per_sec': 200.0,
          'wall_seconds': 123.4,
        },
        f,
      )


def test_results_table_ranks_runs_best_first(tmp_path, caplog):
  write_run(tmp_path / 'learning_rate=0.01', {'learning_rate': 0.01}, [0.5, 0.7, 0.75])
  write_run(tmp_path / 'learning_rate=0.02', {'learning_rate': 0.02}, [0.6, 0.8, 0.85])
  write_run(tmp_path / 'learning_rate=0.04', {'learning_rate': 0.04}, [0.9], finished=False)
  with open(tmp_path / 'learning_rate=0.04' / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 100, "epoch": 0.2, "test_lo')  # Torn by a kill -9 while running.
  (tmp_path / 'slurm').mkdir()  # Not a run.

  text = results.write_results(str(tmp_path))
  assert text.splitlines() == [
    '| run | learning_rate | test top-1 | test top-5 | test loss | steps | wall (s) | status |',
    '| --- | --- | --- | --- | --- | --- | --- | --- |',
    '| learning_rate=0.02 | 0.02 | 0.8500 | 0.9900 | 0.1500 | 150 | 123 | finished |',
    '| learning_rate=0.01 | 0.01 | 0.7500 | 0.9900 | 0.2500 | 150 | 123 | finished |',
    '| learning_rate=0.04 | 0.04 | 0.9000 | 0.9900 | 0.1000 | 50 |  | unfinished |',
  ]
  with open(tmp_path / 'results.md') as f:
    assert f.read() == text
  with open(tmp_path / 'results.csv') as f:
    assert f.read().splitlines()[1] == (
      'learning_rate=0.02,0.02,0.8500,0.9900,0.1500,150,123,finished'
    )
  assert matplotlib.image.imread(tmp_path / 'test_top1.png').shape[:2] == (600, 1000)
  assert 'Skipping line 3 of' in caplog.text and 'learning_rate=0.04' in caplog.text
  assert not [name for name in os.listdir(tmp_path) if name.endswith('.tmp')]  # Replaced whole.


def test_results_of_an_empty_directory_raise(tmp_path):
  with pytest.raises(FileNotFoundError, match='No run'):
    results.write_results(str(tmp_path))


_FAILING_TRAINER = """#!/bin/bash
# Every trainer fails (as a diverged run does); launch.results prints its directory.
if [[ $2 == alexnet_jax.main ]]; then echo "trainer $3 fails"; exit 1; fi
if [[ $2 == launch.results ]]; then echo "table of $3"; fi
"""


def _fake_python(tmp_path, script):
  """tmp_path/python, an executable holding `script`, for a launch script's PYTHON."""
  tmp_path.mkdir(exist_ok=True)
  python = tmp_path / 'python'
  python.write_text(script)
  python.chmod(0o755)
  return python


def _run_experiment(tmp_path, trainer, runs, **env):
  """launch/large_batch_experiment.sh with `trainer` as its python, into tmp_path/out."""
  python = _fake_python(tmp_path, trainer)
  rates = ('SGD_RATE', 'BN_SGD_RATE', 'LARS_RATE', 'BN_LARS_RATE', 'PAPER_RATES')
  environ = {key: value for key, value in os.environ.items() if key not in rates}
  return subprocess.run(
    ['bash', 'launch/large_batch_experiment.sh', str(tmp_path / 'out')],
    cwd=REPO,
    env={**environ, 'PYTHON': str(python), 'RUNS': ' '.join(runs), **env},
    capture_output=True,
    text=True,
    timeout=60,
    check=False,
  )


def test_the_large_batch_experiment_reports_a_failed_run_and_goes_on(tmp_path):
  out = tmp_path / 'out'
  completed = _run_experiment(tmp_path, _FAILING_TRAINER, ('alexnet_sgd_128', 'alexnet_lars_4096'))
  assert completed.returncode == 1
  for name in ('alexnet_sgd_128', 'alexnet_lars_4096'):  # Both tried, in order.
    assert (out / name / 'train.log').read_text() == f'trainer --workdir={out / name} fails\n'
  assert completed.stdout.splitlines()[-1] == f'table of {out}'
  assert completed.stderr.splitlines()[-1] == 'Failed: alexnet_sgd_128 alexnet_lars_4096'


_RECORDING_TRAINER = """#!/bin/bash
# Records each trainer's flags in its workdir's train.log (via the script's tee) and fails,
# so that no run finishes and the script goes on to the next.
if [[ $2 == alexnet_jax.main ]]; then echo "$@"; exit 1; fi
"""


def _learning_rates(tmp_path, **env):
  """{run: its --config.learning_rate flag} of the 4,096 runs the script starts."""
  runs = ('alexnet_sgd_4096', 'alexnet_lars_4096', 'alexnet_bn_sgd_4096', 'alexnet_bn_lars_4096')
  _run_experiment(tmp_path, _RECORDING_TRAINER, runs, **env)
  out = tmp_path / 'out'
  rates = {}
  for name in runs:
    flags = shlex.split((out / name / 'train.log').read_text())
    rates[name] = [flag for flag in flags if flag.startswith('--config.learning_rate=')]
  return rates


def test_the_large_batch_experiment_gives_each_model_its_own_rates(tmp_path):
  set_rates = _learning_rates(
    tmp_path / 'set', SGD_RATE='0.1', BN_SGD_RATE='0.2', LARS_RATE='3', BN_LARS_RATE='4'
  )
  assert set_rates == {
    'alexnet_sgd_4096': ['--config.learning_rate=0.1'],
    'alexnet_lars_4096': ['--config.learning_rate=3'],
    'alexnet_bn_sgd_4096': ['--config.learning_rate=0.2'],
    'alexnet_bn_lars_4096': ['--config.learning_rate=4'],
  }
  # The papers' rates: Goyal et al.'s 0.04 per 128 (the baseline's), You et al.'s LARS 10.
  paper_rates = _learning_rates(tmp_path / 'paper', PAPER_RATES='1')
  assert paper_rates == {
    'alexnet_sgd_4096': ['--config.learning_rate=0.04'],
    'alexnet_lars_4096': ['--config.learning_rate=10'],
    'alexnet_bn_sgd_4096': ['--config.learning_rate=0.04'],
    'alexnet_bn_lars_4096': ['--config.learning_rate=10'],
  }


_TRANSFER_TRAINER = """#!/bin/bash
# Records each call in $CALLS. A trainer writes its results.json and the probe its .npz,
# with test top-1 0.MNS: M the method (finetune 1, frozen 2, scratch 3, probe 4, source 9),
# N the size (50 a class 1, 500 2) and S the seed. The table step (python -) runs on the
# real Python.
if [[ $1 == - ]]; then exec "$REAL_PYTHON" "$@"; fi
printf '%q ' "$@" >> "$CALLS" && echo >> "$CALLS"
top1() {
  local m=9 n=0
  case $1 in */finetune_*) m=1 ;; */frozen_*) m=2 ;; */scratch_*) m=3 ;; */probe_*) m=4 ;; esac
  case $1 in */*_50/*) n=1 ;; */*_500/*) n=2 ;; esac
  [[ $1 =~ seed=([0-9]+) ]] && echo "0.$m$n${BASH_REMATCH[1]}"
}
if [[ $2 == alexnet_jax.main ]]; then
  workdir=${3#--workdir=}
  mkdir -p "$workdir"
  echo "{\\"test_top1\\": $(top1 "$workdir")}" > "$workdir/results.json"
fi
if [[ $2 == alexnet_jax.features ]]; then
  for flag; do [[ $flag == --output=* ]] && output=${flag#--output=}; done
  "$REAL_PYTHON" -c 'import sys, numpy; numpy.savez(sys.argv[1], probe_top1=float(sys.argv[2]))' \\
    "$output" "$(top1 "$output")"
fi
"""


def _run_transfer_experiment(tmp_path):
  """launch/transfer_experiment.sh with a recording trainer; its calls, one list each."""
  python = _fake_python(tmp_path, _TRANSFER_TRAINER)
  calls = tmp_path / 'calls.log'
  calls.write_text('')
  completed = subprocess.run(
    ['bash', 'launch/transfer_experiment.sh', str(tmp_path / 'out')],
    cwd=REPO,
    env={**os.environ, 'PYTHON': str(python), 'REAL_PYTHON': sys.executable, 'CALLS': str(calls)},
    capture_output=True,
    text=True,
    timeout=60,
    check=False,
  )
  assert completed.returncode == 0, completed.stderr
  return [shlex.split(line) for line in calls.read_text().splitlines()]


def test_the_transfer_experiment_trains_fc8_alone_on_the_probes_features_and_resumes(tmp_path):
  out = tmp_path / 'out'
  calls = _run_transfer_experiment(tmp_path)
  trainers = [call for call in calls if call[1] == 'alexnet_jax.main']
  assert len(trainers) == 3 * (1 + 2 * 3)  # Per seed: the source, then 3 methods × 2 sizes.
  assert sum(call[1] == 'alexnet_jax.features' for call in calls) == 3 * 2
  for call in trainers:
    method_size, seed = call[2].split('/')[-2:]  # E.g. 'frozen_50', 'seed=0'.
    if method_size == 'source':
      continue
    method, size = method_size.split('_')
    assert f'--config.train_examples_per_class={size}' in call
    assert (f'--config.init_from={out}/source/{seed}' in call) == (method != 'scratch')
    # fc8 alone learns, on the features the probe reads (eval mode, no flips, one crop),
    # with no weight decay.
    only_fc8 = (
      "--config.lr_multipliers=(('fc8',500.0),('conv[1-5]|fc[67]',0.0))",
      '--config.dropout_rate=0.0',
      '--config.augment.flip=False',
      '--config.weight_decay=0.0',
      '--config.eval_crops=1',
    )
    assert [flag in call for flag in only_fc8] == [method == 'frozen'] * len(only_fc8)
  # Mean and sample std over seeds 0-2 of 0.MN0, 0.MN1, 0.MN2: 0.MN1 ± 0.001.
  assert (out / 'results.md').read_text().splitlines()[2:] == [
    '| finetune | 0.1110 ± 0.0010 (0.1100, 0.1110, 0.1120) | 0.1210 ± 0.0010 (0.1200, 0.1210, 0.1220) |',
    '| frozen | 0.2110 ± 0.0010 (0.2100, 0.2110, 0.2120) | 0.2210 ± 0.0010 (0.2200, 0.2210, 0.2220) |',
    '| probe | 0.4110 ± 0.0010 (0.4100, 0.4110, 0.4120) | 0.4210 ± 0.0010 (0.4200, 0.4210, 0.4220) |',
    '| scratch | 0.3110 ± 0.0010 (0.3100, 0.3110, 0.3120) | 0.3210 ± 0.0010 (0.3200, 0.3210, 0.3220) |',
  ]
  assert _run_transfer_experiment(tmp_path) == []  # A rerun skips every finished run.
