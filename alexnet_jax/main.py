"""Command line: `python -m alexnet_jax.main --config=configs/fashion_mnist.py [--workdir=DIR]`.

Any config key can be overridden, e.g. `--config.batch_size=64`; `--mode=eval` evaluates
the workdir's latest (or `--checkpoint_step`) checkpoint instead of training. Every
process of a multi-process job runs the same command (see README, "Multi-host").
"""

import difflib
import importlib.util
import os
import signal
import sys

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags
import tensorflow as tf

from alexnet_jax import config_lib
from alexnet_jax import evaluate
from alexnet_jax import sharding
from alexnet_jax import train

_WORKDIR = flags.DEFINE_string(
  'workdir',
  None,
  'Directory for checkpoints, metrics and results; a rerun '
  'resumes from it. Default: runs/<config file name>.',
)
_MODE = flags.DEFINE_enum(
  'mode',
  'train',
  ['train', 'eval'],
  'train: train (or resume) and evaluate; eval: '
  'evaluate a checkpoint of --workdir on the whole test split, writing '
  "eval_<step>.json (--config.eval_crops=10 for the paper's 10-crop test); without "
  "--config it uses the run's own config.json.",
)
_CHECKPOINT_STEP = flags.DEFINE_integer(
  'checkpoint_step', None, 'With --mode=eval: the step to evaluate; default the latest.'
)
_PLOTS = flags.DEFINE_bool(
  'plots', True, "After training, draw the run's pictures to <workdir>/plots/ (see README)."
)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
  'allow_config_change',
  False,
  'Resume a workdir whose run was started with other '
  'values of keys that change the model, the data order or the schedule; the change '
  'is recorded in config_changes.jsonl. With --mode=eval: evaluate under a --config or '
  'overrides that change what the parameters compute (LRN, resize, pixel mean/std).',
)
# As jax.distributed.initialize's arguments; SLURM's variables are read without them.
_COORDINATOR_ADDRESS = flags.DEFINE_string(
  'coordinator_address',
  None,
  'Multi-process job: HOST:PORT of process 0, the same for every process.',
)
_NUM_PROCESSES = flags.DEFINE_integer(
  'num_processes', None, 'Multi-process job: how many processes.'
)
_PROCESS_ID = flags.DEFINE_integer(
  'process_id', None, 'Multi-process job: this process, 0..num_processes-1.'
)
_LOCAL_DEVICE_IDS = flags.DEFINE_list(
  'local_device_ids',
  None,
  'Multi-process job: the GPUs this process uses, e.g. 0,1 (default: all it sees).',
)
_DEFAULT_CONFIG = 'configs/fashion_mnist.py'
# Exit status of a run that stopped on request (SIGTERM: a time limit's warning, a
# preemption, a cancel) after checkpointing the step it reached: sysexits.h's EX_TEMPFAIL
# ("temporary failure; the user is invited to retry"), so that a launcher can tell it
# from a failure (1) and rerun it to resume (launch/sweep.py's SLURM script does).
EXIT_STOPPED = os.EX_TEMPFAIL  # 75
config_flags.DEFINE_config_file(
  'config', _DEFAULT_CONFIG, 'Training configuration file.', lock_config=True
)


def _load_config(argv: list[str]) -> ml_collections.ConfigDict:
  """The config file named by `--config=PATH` in argv (or the default), un-overridden."""
  path = _DEFAULT_CONFIG
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      path = arg.removeprefix('--config=')
    elif arg == '--config' and i + 1 < len(argv):
      path = argv[i + 1]
  spec = importlib.util.spec_from_file_location('config_file', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that names the valid keys when a `--config.KEY` is unknown.

  Exits with status 1 and a message on stderr for bad flags, as absl's own parser.
  """
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError) as e:
    message = str(e)
    valid = list(config_lib.flatten(_load_config(argv)))
    given = [
      arg.removeprefix('--config.').split('=')[0] for arg in argv if arg.startswith('--config.')
    ]
    unknown = [key for key in given if key not in valid]
    if unknown:
      close = difflib.get_close_matches(unknown[0], valid, n=3)
      hint = f' Did you mean {", ".join(close)}?' if close else ''
      message = f'Unknown config key {unknown[0]!r}.{hint} Valid keys: {", ".join(valid)}.'
    sys.stderr.write(f'FATAL Flags parsing error: {message}\n')
    sys.exit(1)


def _workdir() -> str:
  """--workdir, or runs/<config file name>.

  Raises:
    config_lib.ConfigError: if it exists and is not a directory.
  """
  workdir = _WORKDIR.value or os.path.join(
    'runs', os.path.splitext(os.path.basename(flags.FLAGS['config'].config_filename))[0]
  )
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise config_lib.ConfigError(
      f'--workdir={workdir} exists and is not a directory: '
      'pass a directory (it is created if missing).'
    )
  return workdir


def _config(workdir: str) -> ml_collections.ConfigDict:
  """--config; for --mode=eval, that or (without --config) the run's config.json plus
  the --config.KEY overrides, refused if it changes what the run's parameters compute
  (`config_lib.check_same_function`) unless --allow_config_change."""
  config_flag = flags.FLAGS['config']
  if _MODE.value == 'eval':
    given = config_flag.value if config_flag.present else None
    return config_lib.for_workdir(
      workdir,
      given,
      dict(config_flag.override_values),
      allow_change=_ALLOW_CONFIG_CHANGE.value,
    )
  return config_flag.value


def _run():
  """Everything after flag parsing; raises what `main` turns into a one-line error."""
  sharding.initialize_distributed(
    _COORDINATOR_ADDRESS.value,
    _NUM_PROCESSES.value,
    _PROCESS_ID.value,
    _LOCAL_DEVICE_IDS.value and [int(i) for i in _LOCAL_DEVICE_IDS.value],
  )
  workdir = _workdir()
  config = _config(workdir)
  logging.info('Config:\n%s', config)
  logging.info('Workdir: %s', workdir)
  config_lib.validate(config, num_devices=jax.device_count(), num_processes=jax.process_count())
  if _MODE.value == 'eval':
    evaluate.evaluate_checkpoint(config, workdir, _CHECKPOINT_STEP.value)
    return
  if jax.process_count() == 1:
    # Preemption (SLURM sends SIGTERM first): checkpoint, then exit EXIT_STOPPED.
    # Several processes leave SIGTERM to JAX's preemption service, which makes them
    # all stop at the same step.
    signal.signal(signal.SIGTERM, train.request_stop)
  train_and_plot(config, workdir, allow_config_change=_ALLOW_CONFIG_CHANGE.value, draw=_PLOTS.value)


def train_and_plot(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  allow_config_change: bool = False,
  draw: bool = True,
) -> dict:
  """`train.train_and_evaluate`, then (if `draw`) the run's pictures (`plots.write_all`).

  A plotting error is logged, never raised: the finished run stays finished.
  """
  results = train.train_and_evaluate(config, workdir, allow_config_change=allow_config_change)
  logging.info('Results: %s', results)
  if not draw:
    return results
  try:  # Pictures are a convenience: never lose a finished run to a plotting error.
    from alexnet_jax import plots  # pylint: disable=g-import-not-at-top

    plots.write_all(config, workdir)
  except Exception:  # pylint: disable=broad-except
    logging.warning('Could not write the plots to %s.', workdir, exc_info=True)
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # tf.data only: keep TensorFlow off any accelerator so JAX has all of its memory.
  tf.config.experimental.set_visible_devices([], 'GPU')
  try:
    _run()
  except train.Preempted as e:
    logging.warning('%s', e)
    if isinstance(e, train.PreemptedWaitingForData):
      logging.flush()
      os._exit(EXIT_STOPPED)  # Checkpoints and logs are complete; see PreemptedWaitingForData.
    sys.exit(EXIT_STOPPED)
  except (ValueError, FloatingPointError, FileNotFoundError) as e:
    # What the user must fix (a config value, a missing file, a NaN) as the last line;
    # the traceback above it is logged for a bug report.
    logging.exception('%s', type(e).__name__)
    sys.exit(f'{type(e).__name__}: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
