"""How many classes a train batch holds at ImageNet's real sizes, on labels alone: the
prepared copy's order and the reader's file/interleave/shuffle structure, before and now.

  python -m benchmarks.class_mixing [--batches=200] [--part_batches=10]

ImageNet's 1,281,167 train images of 1,000 classes (here 1,281 or 1,282 a class), in
1,024-example files (`prepare.SHARD_EXAMPLES`), read as `input_pipeline` reads a
prepared copy: part p of `--parts` (TFDS even splits, cut inside a file where they
fall), the files interleaved 16 at a time (TFDS's `interleave_cycle_length`), a
16,384-example shuffle buffer (configs/default.py), batches of 128. Only int labels
flow through tf.data (no pixels); each layout is:
  before     the copy in the tars' order (class by class), files in stored order,
             16 examples from a file at a time (TFDS's default block length);
  reader     the same copy, files in a seeded order every epoch, 1 example at a time;
  now        the copy in prepare's seeded order (`prepare.TRAIN_ORDER_SEED`) and the
             reader as above.
Printed: the distinct classes per batch (mean and minimum over the first `--batches`),
the classes met in the first 100 batches, and per part of `--parts` the classes met in
its first `--part_batches` batches of 128 / parts rows; the i.i.d. expectation of
distinct classes in B draws from C balanced classes is C (1 - (1 - 1/C)^B).
"""

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

from alexnet_jax import prepare

CLASSES = 1000
EXAMPLES = 1_281_167  # ILSVRC 2012 train (TFDS imagenet2012).
FILE_EXAMPLES = 1024  # prepare.SHARD_EXAMPLES.
CYCLE = 16  # tfds.ReadConfig's interleave_cycle_length.
TFDS_BLOCK = 16  # tfds.ReadConfig's interleave_block_length default.
BUFFER = 16_384  # configs/default.py shuffle_buffer.
BATCH = 128

flags.DEFINE_integer('batches', 200, 'Batches of the whole split to count classes in.')
flags.DEFINE_integer('part_batches', 10, 'Batches of each part to count classes in.')
flags.DEFINE_integer('parts', 2, 'Processes (parts of the split, TFDS even splits).')
FLAGS = flags.FLAGS


def tar_order() -> np.ndarray:
  """The train labels class by class, as the tars hold them, int64 [EXAMPLES]."""
  return np.sort(np.arange(EXAMPLES) % CLASSES)


def part_files(labels: np.ndarray, part: int, parts: int) -> list[np.ndarray]:
  """The labels of each file of part `part` of `parts`: its examples [a, b) of the split
  (TFDS's even split) cut at the files' boundaries."""
  start, end = part * EXAMPLES // parts, (part + 1) * EXAMPLES // parts
  bounds = sorted(
    {start, end, *range(-(-start // FILE_EXAMPLES) * FILE_EXAMPLES, end, FILE_EXAMPLES)}
  )
  return [labels[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def stream(files: list[np.ndarray], block: int, shuffle_files: bool, seed: int) -> tf.data.Dataset:
  """Batches of labels of epoch 0 as the reader streams them."""
  ragged = tf.RaggedTensor.from_row_lengths(np.concatenate(files), [len(f) for f in files])
  order = tf.data.Dataset.range(len(files))
  if shuffle_files:
    order = order.shuffle(len(files), seed=seed)
  ds = order.interleave(
    lambda i: tf.data.Dataset.from_tensor_slices(ragged[i]), cycle_length=CYCLE, block_length=block
  )
  return ds.shuffle(BUFFER, seed=seed)


def report(name: str, labels: np.ndarray, block: int, shuffle_files: bool):
  whole = stream(part_files(labels, 0, 1), block, shuffle_files, seed=0).batch(BATCH)
  batches = list(whole.take(FLAGS.batches).as_numpy_iterator())
  distinct = [len(np.unique(b)) for b in batches]
  first_100 = len(np.unique(np.concatenate(batches[:100])))
  parts = []
  for part in range(FLAGS.parts):
    ds = stream(part_files(labels, part, FLAGS.parts), block, shuffle_files, seed=0)
    ds = ds.batch(BATCH // FLAGS.parts)
    seen = list(ds.take(FLAGS.part_batches).as_numpy_iterator())
    parts.append(len(np.unique(np.concatenate(seen))))
  print(
    f'| {name} | {np.mean(distinct):.1f} | {min(distinct)} | {first_100} | '
    f'{" / ".join(map(str, parts))} |',
    flush=True,
  )


def main(argv):
  del argv
  iid = CLASSES * (1 - (1 - 1 / CLASSES) ** BATCH)
  part_iid = CLASSES * (1 - (1 - 1 / CLASSES) ** (FLAGS.part_batches * BATCH // FLAGS.parts))
  print(
    f'{EXAMPLES} examples of {CLASSES} classes in {FILE_EXAMPLES}-example files, buffer '
    f'{BUFFER}, batch {BATCH}; i.i.d.: {iid:.1f} classes a batch, {part_iid:.1f} in a '
    f"part's first {FLAGS.part_batches} batches"
  )
  print(
    '| layout | classes a batch (mean) | (min) | classes in 100 batches | '
    f'classes per part in {FLAGS.part_batches} batches |'
  )
  print('| --- | --- | --- | --- | --- |')
  sorted_labels = tar_order()
  shuffled = sorted_labels[np.random.RandomState(prepare.TRAIN_ORDER_SEED).permutation(EXAMPLES)]
  report('before: tar order, files in order, block 16', sorted_labels, TFDS_BLOCK, False)
  report('reader alone: tar order, files shuffled, block 1', sorted_labels, 1, True)
  report('now: prepare shuffled, files shuffled, block 1', shuffled, 1, True)


if __name__ == '__main__':
  tf.config.set_visible_devices([], 'GPU')
  app.run(main)
