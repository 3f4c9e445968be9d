"""The ImageNet train input side by side in one run: original JPEGs vs prepared copies,
and the CPU train step with uint8 input and device augmentation vs float32 input.

  python -m benchmarks.input_pipeline [--num_images=1024] [--batches=16] [--rounds=3]
  python -m benchmarks.input_pipeline --config=configs/fashion_mnist.py   # its real data

With the ImageNet config (default) it writes `--num_images` real-photograph JPEGs at
500×375, quality 90 (`benchmarks.image_folder`), prepares them once as JPEG (quality
95) and as raw pixels (`alexnet_jax.prepare`, timed), and reads train batches of
configs/imagenet.py (resize 256, random 227 crop, flip, PCA lighting) from:
  original, host float  the original JPEGs, with the flip, lighting and normalisation
                        on the host in float32 (the pipeline before this change,
                        rebuilt here from today's functions),
  original              the original JPEGs (crop on the host, uint8 batches),
  prepared jpeg         the prepared JPEG copy (only the crop window decoded),
  prepared raw          the prepared raw copy (a slice).
Each is timed in `--rounds` interleaved rounds of `--batches` batches (a new stream
each time, after 2 warm-up batches); the median is printed, in img/s and img/s per
core (the decode threads the pipeline uses). Then the
train step (`--step_batch`, 227 px, this machine's devices) is timed on float32 model
input and on uint8 batches with 'flip' and 'lighting' (`augment.model_input` in the
step), alternating, `--rounds` windows of `--steps` steps each.
"""

import os
import statistics
import tempfile
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np
import optax
import tensorflow as tf

from alexnet_jax import input_pipeline
from alexnet_jax import optimizers
from alexnet_jax import prepare
from alexnet_jax import sharding
from alexnet_jax import steps
from benchmarks.image_folder import write_image_folder

_NUM_IMAGES = flags.DEFINE_integer('num_images', 1024, 'Photograph JPEGs (ImageNet config).')
_BATCHES = flags.DEFINE_integer('batches', 16, 'Timed batches per round, after 2 warm-up ones.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Interleaved rounds (the median is printed).')
_STEP_BATCH = flags.DEFINE_integer('step_batch', 64, 'Train step batch; 0 skips the step.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed train steps per window.')
config_flags.DEFINE_config_file('config', 'configs/imagenet.py', 'Input settings.')


_PREPROCESS_TRAIN = input_pipeline.preprocess_train


def host_float_preprocess(encoded, seed, config):
  """The host's work before batches crossed as uint8: today's crop and draws, then the
  flip, PCA lighting and normalisation in float32 on the host."""
  example = _PREPROCESS_TRAIN(encoded, seed, config)
  image = tf.cast(example['image'], tf.float32)
  image = tf.where(example['flip'], tf.reverse(image, axis=[1]), image) + example['lighting']
  image = (image - tf.constant(config.pixel_mean)) / tf.constant(config.pixel_std)
  return {'image': image}


def train_stream(config, host_float: bool = False):
  """The train batches of `config` (with `host_float`, `host_float_preprocess`'s)."""
  if host_float:  # create_datasets reads the module's function when it traces.
    input_pipeline.preprocess_train = host_float_preprocess
  try:
    batches = input_pipeline.create_datasets(config).train_batches()
    next(batches)  # Traced (and the shuffle buffer filled) with the function above.
  finally:
    input_pipeline.preprocess_train = _PREPROCESS_TRAIN
  next(batches)
  return batches


def time_batches(batches, count: int, batch_size: int) -> float:
  start = time.perf_counter()
  for _ in range(count):
    next(batches)
  return count * batch_size / (time.perf_counter() - start)


def compare_inputs(config, root: str, data_dir: str):
  """Prepares the folder at `root` twice (into `data_dir`), prints each input's img/s."""
  threads = input_pipeline.decode_threads()
  config.update(
    dataset='image_folder',
    manual_dir=root,
    data_dir=data_dir,
    test_split='val',
    num_classes=2,
    shuffle_buffer=_NUM_IMAGES.value,
  )
  variants = {'original, host float': (config, True), 'original': (config, False)}
  for fmt in ('jpeg', 'raw'):
    prepared = config.copy_and_resolve_references()
    prepared.update(prepared=True, prepared_format=fmt)
    start = time.perf_counter()
    directory = prepare.prepare(prepared)
    seconds = time.perf_counter() - start
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(directory) for f in fs)
    print(
      f'prepare {fmt}: {_NUM_IMAGES.value + 2} images in {seconds:.1f} s '
      f'({(_NUM_IMAGES.value + 2) / seconds:.0f} img/s), {size / 2**20:.1f} MiB'
    )
    variants[f'prepared {fmt}'] = (prepared, False)
  rates = {name: [] for name in variants}
  for _ in range(_ROUNDS.value):
    for name, (c, host_float) in variants.items():
      # A new stream each time, alone: no other stream's threads fill their buffers.
      batches = train_stream(c, host_float)
      rates[name].append(time_batches(batches, _BATCHES.value, config.batch_size))
      del batches
  print(
    f'train batches of {config.batch_size}, {config.image_size} px from {config.resize_size}, '
    f'{_NUM_IMAGES.value} photographs 500×375 q90, {threads} decode threads, '
    f'{os.cpu_count()} CPUs; median of {_ROUNDS.value} rounds of {_BATCHES.value} batches:'
  )
  base = statistics.median(rates['original, host float'])
  for name, values in rates.items():
    rate = statistics.median(values)
    print(
      f'  {name:22s} {rate:8.0f} img/s {rate / threads:8.0f} img/s/core  '
      f'{rate / base:5.1f}×  (rounds: {", ".join(f"{v:.0f}" for v in values)})'
    )


def compare_steps(config):
  """Prints the train step's img/s on float32 model input and on uint8 batches."""
  config.update(batch_size=_STEP_BATCH.value, num_classes=1000)
  mesh = sharding.create_mesh(config.mesh)
  tx = optimizers.create_optimizer(config, optax.constant_schedule(config.learning_rate))
  state = steps.create_train_state(config, tx, jax.random.key(0), mesh)
  normalization = (config.pixel_mean, config.pixel_std)
  train_step = steps.jit_train_step(mesh, steps.graphdefs(config)[0], state, tx, normalization)
  rng = np.random.RandomState(0)
  n, s = config.batch_size, config.image_size
  labels = rng.randint(0, config.num_classes, n).astype(np.int32)
  batches = {
    'float32 model input': {'image': rng.randn(n, s, s, 3).astype(np.float32), 'label': labels},
    'uint8 + device augmentation': {
      'image': rng.randint(0, 256, (n, s, s, 3), np.uint8),
      'flip': rng.rand(n) < 0.5,
      'lighting': rng.randn(n, 3).astype(np.float32) * 5,
      'label': labels,
    },
  }
  batches = {name: sharding.global_batch(mesh, b) for name, b in batches.items()}
  dropout_rng = jax.random.key(1)
  for batch in batches.values():  # Compile and warm up both.
    state, _ = train_step(state, batch, dropout_rng)
  jax.block_until_ready(state)
  rates = {name: [] for name in batches}
  for _ in range(_ROUNDS.value):
    for name, batch in batches.items():
      start = time.perf_counter()
      for _ in range(_STEPS.value):
        state, metrics = train_step(state, batch, dropout_rng)
      jax.block_until_ready((state, metrics))
      rates[name].append(_STEPS.value * n / (time.perf_counter() - start))
  print(
    f'train step, batch {n}, {s} px, {jax.device_count()} {jax.default_backend()} '
    f'device(s); median of {_ROUNDS.value} windows of {_STEPS.value} steps:'
  )
  for name, values in rates.items():
    print(
      f'  {name:28s} {statistics.median(values):8.1f} img/s  '
      f'(windows: {", ".join(f"{v:.1f}" for v in values)})'
    )


def main(argv):
  del argv
  config = flags.FLAGS.config
  if config.dataset != 'imagenet2012':  # Its own data, as training reads it.
    batches = train_stream(config)
    rate = statistics.median(
      time_batches(batches, _BATCHES.value, config.batch_size) for _ in range(_ROUNDS.value)
    )
    print(f'{config.dataset}: {rate:.0f} img/s ({input_pipeline.decode_threads()} threads)')
    return
  with tempfile.TemporaryDirectory() as root, tempfile.TemporaryDirectory() as data_dir:
    write_image_folder(root, _NUM_IMAGES.value)
    compare_inputs(config.copy_and_resolve_references(), root, data_dir)
  if _STEP_BATCH.value:
    compare_steps(config)


if __name__ == '__main__':
  tf.config.experimental.set_visible_devices([], 'GPU')  # tf.data only.
  app.run(main)
