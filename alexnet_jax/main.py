"""Command line: `python -m alexnet_jax.main --config=configs/fashion_mnist.py [--workdir=DIR]`.

Any config key can be overridden, e.g. `--config.batch_size=64`; `--mode=eval` evaluates
the workdir's latest (or `--checkpoint_step`) checkpoint instead of training.
"""

import difflib
import importlib.util
import os
import signal
import sys

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags
import tensorflow as tf

from alexnet_jax import evaluate
from alexnet_jax import sharding
from alexnet_jax import train

_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for checkpoints, metrics and results; a rerun '
    'resumes from it. Default: runs/<config file name>.')
_MODE = flags.DEFINE_enum(
    'mode', 'train', ['train', 'eval'], 'train: train (or resume) and evaluate; eval: '
    'evaluate a checkpoint of --workdir on the whole test split, writing '
    'eval_<step>.json (--config.eval_crops=10 for the paper\'s 10-crop test).')
_CHECKPOINT_STEP = flags.DEFINE_integer(
    'checkpoint_step', None, 'With --mode=eval: the step to evaluate; default the latest.')
_DEFAULT_CONFIG = 'configs/fashion_mnist.py'
config_flags.DEFINE_config_file(
    'config', _DEFAULT_CONFIG, 'Training configuration file.', lock_config=True)


def config_keys(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  """Dotted names of every leaf of `config`, e.g. 'augment.flip'."""
  keys = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      keys += config_keys(value, f'{prefix}{key}.')
    else:
      keys.append(prefix + key)
  return keys


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
    valid = config_keys(_load_config(argv))
    given = [arg.removeprefix('--config.').split('=')[0]
             for arg in argv if arg.startswith('--config.')]
    unknown = [key for key in given if key not in valid]
    if unknown:
      close = difflib.get_close_matches(unknown[0], valid, n=3)
      hint = f' Did you mean {", ".join(close)}?' if close else ''
      e = f'Unknown config key {unknown[0]!r}.{hint} Valid keys: {", ".join(valid)}.'
    sys.stderr.write(f'FATAL Flags parsing error: {e}\n')
    sys.exit(1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # tf.data only: keep TensorFlow off any accelerator so JAX has all of its memory.
  tf.config.experimental.set_visible_devices([], 'GPU')
  sharding.initialize_distributed()
  # Preemption (SLURM sends SIGTERM first): checkpoint, then exit non-zero to requeue.
  signal.signal(signal.SIGTERM, train.request_stop)
  config = flags.FLAGS.config
  workdir = _WORKDIR.value or os.path.join(
      'runs', os.path.splitext(os.path.basename(flags.FLAGS['config'].config_filename))[0])
  logging.info('Config:\n%s', config)
  logging.info('Workdir: %s', workdir)
  if _MODE.value == 'eval':
    evaluate.evaluate_checkpoint(config, workdir, _CHECKPOINT_STEP.value)
    return
  try:
    results = train.train_and_evaluate(config, workdir)
  except train.Preempted as e:
    logging.warning('%s', e)
    sys.exit(1)  # Non-zero, so a cluster requeues the job.
  logging.info('Results: %s', results)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
