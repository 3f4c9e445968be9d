"""Runs a config sweep: one `python -m alexnet_jax.main` per point, locally or on SLURM.

  python -m launch.sweep --config=configs/fashion_mnist.py --workdir=runs/lr_sweep \\
      [--sweep='config.learning_rate=[0.005,0.01]' ...] [--parallel=N] [--dry_run] \\
      [--backend=slurm] [--config.num_train_steps=200 ...]

The points come from the config file's `sweep(add)` (big_vision style: it calls
`add(learning_rate=0.01, ...)` once per run), or, when given, from the `--sweep` axes
instead (their product, or with `--zip` their zip). Every run gets a readable name
(`learning_rate=0.01,seed=1`) and the workdir `<--workdir>/<name>/`, where it writes
`overrides.json`, `train.log` and the trainer's outputs; runs with a `results.json`
are finished and skipped, so relaunching the same command resumes the sweep.
"""

import ast
import concurrent.futures
import copy
import dataclasses
import importlib.util
import itertools
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from alexnet_jax import files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

Overrides = dict[str, Any]  # Dotted config key -> value, e.g. {'augment.flip': False}.


def product(**axes: Sequence[Any]) -> list[Overrides]:
  """Every combination of the axes' values, the last axis varying fastest.

  product(lr=[1, 2], seed=[0, 1]) == [{'lr': 1, 'seed': 0}, {'lr': 1, 'seed': 1},
  {'lr': 2, 'seed': 0}, {'lr': 2, 'seed': 1}].
  """
  keys = list(axes)
  return [dict(zip(keys, values, strict=True)) for values in itertools.product(*axes.values())]


def zip_axes(**axes: Sequence[Any]) -> list[Overrides]:
  """The axes' i-th values together: zip_axes(lr=[1, 2], wd=[3, 4]) has 2 points.

  Raises:
    ValueError: if the axes differ in length.
  """
  lengths = {key: len(values) for key, values in axes.items()}
  if len(set(lengths.values())) > 1:
    raise ValueError(f'Zipped axes must have equal lengths, got {lengths}.')
  keys = list(axes)
  return [dict(zip(keys, values, strict=True)) for values in zip(*axes.values(), strict=True)]


def parse_axis(spec: str) -> tuple[str, list[Any]]:
  """'config.learning_rate=[0.005,0.01]' -> ('learning_rate', [0.005, 0.01]).

  Values are Python literals; unquoted words are strings: 'lr_schedule=[step,cosine]'.

  Raises:
    ValueError: if `spec` is not KEY=[V1,V2,...].
  """
  key, sep, values = spec.partition('=')
  values = values.strip()
  if not sep or not values.startswith('[') or not values.endswith(']'):
    raise ValueError(
      f"--sweep={spec!r}: expected KEY=[V1,V2,...], e.g. 'config.learning_rate=[0.005,0.01]'."
    )
  try:
    parsed = ast.literal_eval(values)
  except (ValueError, SyntaxError):
    parsed = [_literal(v.strip()) for v in values[1:-1].split(',')]
  return key.strip().removeprefix('config.'), list(parsed)


def _literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def config_sweep(config_path: str) -> list[Overrides]:
  """The points that the config file's `sweep(add)` adds; [{}] if it has none."""
  spec = importlib.util.spec_from_file_location('swept_config', config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'sweep'):
    return [{}]
  points = []
  module.sweep(lambda **overrides: points.append(overrides))
  return points


def format_value(value: Any) -> str:
  """A value as `--config.KEY=` takes it: strings bare, the rest as Python literals."""
  return value if isinstance(value, str) else repr(value).replace(' ', '')


def run_name(overrides: Overrides) -> str:
  """'learning_rate=0.01,seed=1' (in the order given); 'base' with no overrides."""
  if not overrides:
    return 'base'
  return ','.join(f'{k}={format_value(v)}' for k, v in overrides.items()).replace('/', '_')


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  overrides: Overrides
  workdir: str

  @property
  def finished(self) -> bool:
    return os.path.exists(os.path.join(self.workdir, 'results.json'))


def expand(points: Sequence[Overrides], sweep_workdir: str) -> list[Run]:
  """One `Run` per point, in `<sweep_workdir>/<name>/`.

  Raises:
    ValueError: if two points get the same name.
  """
  runs = [Run(run_name(p), dict(p), os.path.join(sweep_workdir, run_name(p))) for p in points]
  names = [run.name for run in runs]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(f'The sweep has repeated points: {duplicates}.')
  return runs


def check_overrides(config: ml_collections.ConfigDict, runs: Sequence[Run], passthrough: Overrides):
  """Fails before anything is launched if a run's overrides do not fit `config`.

  Raises:
    KeyError: for a key the config does not have (naming the close ones).
    TypeError: for a value of the wrong type, e.g. 0.5 for batch_size.
    ValueError: for a key both swept and passed as `--config.KEY`.
  """
  for run in runs:
    both = sorted(set(run.overrides) & set(passthrough))
    if both:
      raise ValueError(f'{both} are swept and also set with --config.KEY: drop one.')
    copy.deepcopy(config).update_from_flattened_dict(run.overrides)


def command(
  run: Run, config_arg: str, passthrough: Overrides, python: str = sys.executable
) -> list[str]:
  """The trainer's command line for `run`: shared `passthrough` overrides, then its own."""
  overrides = {**passthrough, **run.overrides}
  return [
    python,
    '-m',
    'alexnet_jax.main',
    f'--config={config_arg}',
    f'--workdir={run.workdir}',
    *(f'--config.{k}={format_value(v)}' for k, v in overrides.items()),
  ]


def prepare(run: Run):
  os.makedirs(run.workdir, exist_ok=True)
  files.write_json(os.path.join(run.workdir, 'overrides.json'), run.overrides)


def run_local(
  runs: Sequence[Run], commands: Sequence[Sequence[str]], parallel: int
) -> dict[str, int]:
  """Runs the commands, `parallel` at a time, each logging to `<workdir>/train.log`.

  Returns:
    The exit status of each run, by name.
  """

  def launch(run, cmd):
    prepare(run)
    start = time.time()
    logging.info('Started %s.', run.name)
    with open(os.path.join(run.workdir, 'train.log'), 'a') as log:
      status = subprocess.run(
        cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=False
      ).returncode
    logging.info(
      '%s %s after %.0f s (exit status %d).',
      'Finished' if status == 0 else 'FAILED',
      run.name,
      time.time() - start,
      status,
    )
    return status

  with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
    statuses = pool.map(launch, runs, commands)
    return {run.name: status for run, status in zip(runs, statuses, strict=True)}


# The trainer's exit status after stopping on request, checkpointed: alexnet_jax.main's
# EXIT_STOPPED (not imported: alexnet_jax.main defines flags of the same names as this
# command's).
TRAINER_STOPPED = os.EX_TEMPFAIL


def slurm_script(
  runs: Sequence[Run],
  commands: Sequence[Sequence[str]],
  *,
  job_name: str,
  log_dir: str,
  nodes: int = 1,
  gpus_per_node: int = 1,
  sbatch_options: Sequence[str] = (),
) -> str:
  """An sbatch job array: task i runs `commands[i]` under srun, one process per node.

  With several nodes, srun starts the trainer once per node and `alexnet_jax.main`
  joins them into one JAX job from the job step's SLURM variables (SLURM_STEP_NUM_TASKS,
  SLURM_PROCID, SLURM_STEP_NODELIST; `sharding.initialize_distributed`).

  Stops (tested on a real SLURM 22.05, tests/slurm_test.py): 120 s before the time limit
  SIGTERM comes to the batch shell (`--signal=B:TERM@120`), which passes it on to the
  trainers with `scancel --signal=TERM` on its own job (slurmd signals the job step's
  tasks; srun itself is never signalled: it would answer with SIGKILL). A preemption
  sends SIGTERM to the trainers directly. Either way they checkpoint the step they
  reached and exit with TRAINER_STOPPED, and the script requeues the task, which then
  resumes from that checkpoint (SLURM itself requeues a preempted job only if it
  outlives the partition's GraceTime). A user's `scancel` also stops the trainers with
  TRAINER_STOPPED, but leaves the job COMPLETING, not RUNNING: it is not requeued.
  Otherwise the task ends with the trainers' status: 0 for a finished run, the
  failure's status for a failed one (not rerun: it would fail again).

  Args:
    gpus_per_node: GPUs each node asks for; 0 asks for none (CPU clusters).
    sbatch_options: extra `#SBATCH` options without the dashes, e.g. 'partition=gpu'.
  """
  cases = '\n'.join(
    f'  {i}) cmd=({shlex.join(cmd)}) ;;  # {run.name}'
    for i, (run, cmd) in enumerate(zip(runs, commands, strict=True))
  )
  options = [
    f'job-name={job_name}',
    f'array=0-{len(runs) - 1}',
    f'nodes={nodes}',
    'ntasks-per-node=1',
    f'output={log_dir}/%A_%a.out',
    'open-mode=append',
    'requeue',
    'signal=B:TERM@120',
    *sbatch_options,
  ]
  if gpus_per_node:
    options.insert(4, f'gpus-per-node={gpus_per_node}')
  return f"""#!/bin/bash
{chr(10).join('#SBATCH --' + o for o in options)}
set -uo pipefail
# SIGTERM to this shell (the time limit's warning) goes on to the trainers through slurmd,
# not to srun, which would SIGKILL them ("forcing job termination").
term=0 trainer=
trap 'term=1; if [[ -n $trainer ]]; then scancel --signal=TERM "$SLURM_JOB_ID"; fi' TERM
cd {shlex.quote(REPO)}
case "$SLURM_ARRAY_TASK_ID" in
{cases}
esac
if (( term )); then
  status={TRAINER_STOPPED}  # Stopped before it started: nothing to checkpoint.
else
  # One trainer per node ({nodes} node(s)); they find each other through SLURM's variables.
  srun --ntasks-per-node=1 "${{cmd[@]}}" &
  trainer=$!
  if (( term )); then scancel --signal=TERM "$SLURM_JOB_ID"; fi  # Came before `trainer=`.
  # SIGTERM cuts `wait` short while srun runs on: wait again, until srun has ended.
  while wait "$trainer"; status=$?; kill -0 "$trainer" 2>/dev/null; do :; done
fi
# Requeue a task whose trainers stopped on request (and checkpointed), unless the job is
# ending anyway: a user's scancel leaves it COMPLETING, a time limit's warning or a
# preemption RUNNING.
if (( status == {TRAINER_STOPPED} )) && [[ $(squeue -h -j "$SLURM_JOB_ID" -o %T) == RUNNING ]]; then
  echo "Stopped on request: requeuing $SLURM_JOB_ID to resume." >&2
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
"""


def define_flags():
  """Defines the command's flags (at run time only, so that importing this module
  next to alexnet_jax.main, e.g. in tests, defines no flag twice)."""
  flags.DEFINE_string('workdir', None, 'Sweep directory: one subdirectory per run.', required=True)
  config_flags.DEFINE_config_file(
    'config',
    None,
    'Training config file (optionally FILE:ARG); its sweep(add) gives '
    'the runs unless --sweep is given. --config.KEY=VALUE applies to every run.',
    lock_config=True,
  )
  flags.DEFINE_multi_string(
    'sweep',
    [],
    "An axis KEY=[V1,V2,...], e.g. 'config.seed=[0,1]'; several are "
    "crossed (or zipped with --zip). Replaces the config's sweep().",
  )
  flags.DEFINE_bool('zip', False, 'Zip the --sweep axes instead of crossing them.')
  flags.DEFINE_integer('parallel', 1, 'Local runs at a time.', lower_bound=1)
  flags.DEFINE_bool('dry_run', False, 'Print the runs and commands; run nothing.')
  flags.DEFINE_enum(
    'backend', 'local', ['local', 'slurm'], 'local: subprocesses here; slurm: an sbatch job array.'
  )
  flags.DEFINE_integer('slurm_nodes', 1, 'Nodes per run (slurm).', lower_bound=1)
  flags.DEFINE_integer('slurm_gpus_per_node', 1, 'GPUs per node (slurm); 0: none.', lower_bound=0)
  flags.DEFINE_multi_string(
    'sbatch', [], "Extra #SBATCH option (slurm), e.g. 'partition=gpu', 'time=24:00:00'."
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  FLAGS = flags.FLAGS
  config_flag = FLAGS['config']
  if config_flag.value is None:
    raise app.UsageError('--config is required.')
  # Absolute, since the runs start in the repository root.
  path, sep, arg = config_flag.config_filename.partition(':')
  config_arg = os.path.abspath(path) + sep + arg
  passthrough = dict(config_flag.override_values)
  if FLAGS.sweep:
    axes = dict(parse_axis(spec) for spec in FLAGS.sweep)
    points = zip_axes(**axes) if FLAGS.zip else product(**axes)
  else:
    points = config_sweep(os.path.abspath(path))
  sweep_workdir = os.path.abspath(FLAGS.workdir)
  runs = expand(points, sweep_workdir)
  check_overrides(config_flag.value, runs, passthrough)
  todo = [run for run in runs if not run.finished]
  commands = [command(run, config_arg, passthrough) for run in todo]
  logging.info('%d runs, %d finished, %d to run.', len(runs), len(runs) - len(todo), len(todo))
  if FLAGS.dry_run or not todo:
    for run in runs:
      print(f'{run.name}: {"finished" if run.finished else "to run"}, {run.workdir}')
    for cmd in commands:
      print(shlex.join(cmd))
    return

  if FLAGS.backend == 'slurm':
    for run in todo:
      prepare(run)
    log_dir = os.path.join(sweep_workdir, 'slurm')
    os.makedirs(log_dir, exist_ok=True)
    script = os.path.join(sweep_workdir, 'sweep.sbatch')
    files.write_text(
      script,
      slurm_script(
        todo,
        commands,
        job_name=os.path.basename(sweep_workdir),
        log_dir=log_dir,
        nodes=FLAGS.slurm_nodes,
        gpus_per_node=FLAGS.slurm_gpus_per_node,
        sbatch_options=FLAGS.sbatch,
      ),
    )
    if shutil.which('sbatch'):
      subprocess.run(['sbatch', script], check=True)
    else:
      print(f'No sbatch here: wrote {script}; submit it with `sbatch {script}`.')
    return

  statuses = run_local(todo, commands, FLAGS.parallel)
  failed = [name for name, status in statuses.items() if status]
  print(
    f'{len(statuses) - len(failed)} of {len(statuses)} runs finished; '
    f'`python -m launch.results {FLAGS.workdir}` tabulates the sweep.'
  )
  if failed:
    sys.exit(f'Failed (see their train.log): {", ".join(failed)}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
