"""Command line: `python -m alexnet_jax.main --config=configs/fashion_mnist.py [--workdir=DIR]`.

Any config key can be overridden, e.g. `--config.batch_size=64`.
"""

import difflib
import os
import signal

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags
import tensorflow as tf

from alexnet_jax import train

_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for checkpoints, metrics and results; a rerun '
    'resumes from it. Default: runs/<config file name>.')
config_flags.DEFINE_config_file(
    'config', 'configs/fashion_mnist.py', 'Training configuration file.', lock_config=True)


def config_keys(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  """Dotted names of every leaf of `config`, e.g. 'augment.flip'."""
  keys = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      keys += config_keys(value, f'{prefix}{key}.')
    else:
      keys.append(prefix + key)
  return keys


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, naming the valid keys when a `--config.KEY` is unknown."""
  try:
    return flags.FLAGS(argv)
  except flags.UnrecognizedFlagError as e:
    if not e.flagname.startswith('config.'):
      raise
    key = e.flagname.removeprefix('config.')
    valid = config_keys(flags.FLAGS['config'].value)
    close = difflib.get_close_matches(key, valid, n=3)
    hint = f' Did you mean {", ".join(close)}?' if close else ''
    raise flags.Error(f'Unknown config key {key!r} (--{e.flagname}).{hint} Valid keys: '
                      f'{", ".join(valid)}.') from e


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # tf.data only: keep TensorFlow off any accelerator so JAX has all of its memory.
  tf.config.experimental.set_visible_devices([], 'GPU')
  # Set by launch/sweep.py's SLURM script for multi-node runs; process ids come from srun.
  if 'JAX_COORDINATOR_ADDRESS' in os.environ:
    jax.distributed.initialize()
  # Preemption (SLURM sends SIGTERM first): checkpoint, then exit non-zero to requeue.
  signal.signal(signal.SIGTERM, train.request_stop)
  config = flags.FLAGS.config
  workdir = _WORKDIR.value or os.path.join(
      'runs', os.path.splitext(os.path.basename(flags.FLAGS['config'].config_filename))[0])
  logging.info('Config:\n%s', config)
  logging.info('Workdir: %s', workdir)
  results = train.train_and_evaluate(config, workdir)
  logging.info('Results: %s', results)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
