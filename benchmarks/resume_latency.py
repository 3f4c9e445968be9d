"""Time from `train_batches(start_step)` to the first batch, against the resume epoch.

  python -m benchmarks.resume_latency [--num_images=2000] [--epochs=0,5,20,40]

Writes `--num_images` random 160×120 JPEGs as an image folder (ImageNet config, paper
augmentation, batch 128) and resumes its train stream at the start of each epoch
listed and halfway through the last one. A resume builds its epoch directly and skips
within it only (`input_pipeline.create_datasets`), so the time should not grow with the
epoch; halfway through an epoch it reads up to that epoch's examples once more.
"""

import tempfile
import time

from absl import app
from absl import flags

from alexnet_jax import input_pipeline
from benchmarks.image_folder import write_image_folder
from configs import imagenet

_NUM_IMAGES = flags.DEFINE_integer('num_images', 2000, 'Generated JPEGs.')
_EPOCHS = flags.DEFINE_list('epochs', ['0', '5', '20', '40'], 'Resume epochs.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timings per epoch; the median is printed.')


def first_batch_seconds(data: input_pipeline.Datasets, step: int) -> float:
  start = time.perf_counter()
  next(data.train_batches(start_step=step))
  return time.perf_counter() - start


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as root:
    write_image_folder(root, _NUM_IMAGES.value, num_classes=10, size=(160, 120))
    config = imagenet.get_config()
    config.update(dataset='image_folder', manual_dir=root, test_split='val', num_classes=10)
    data = input_pipeline.create_datasets(config)
    steps_per_epoch = data.steps_per_epoch
    print(
      f'{_NUM_IMAGES.value} JPEGs of 160×120, batch {config.batch_size}: '
      f'{steps_per_epoch} steps per epoch'
    )
    first_batch_seconds(data, 0)  # Warm-up: file caches, tf.data's first graph.
    epochs = [float(e) for e in _EPOCHS.value]
    epochs.append(epochs[-1] + 0.5)
    for epoch in epochs:
      step = int(epoch * steps_per_epoch)
      seconds = sorted(first_batch_seconds(data, step) for _ in range(_REPEATS.value))
      print(
        f'resume at epoch {epoch:5.1f} (step {step:5d}): first batch after '
        f'{seconds[len(seconds) // 2]:.2f} s (median of {len(seconds)})'
      )


if __name__ == '__main__':
  app.run(main)
