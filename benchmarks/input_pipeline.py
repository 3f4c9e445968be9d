"""Measures the tf.data train pipeline alone: decode + augment img/s on this machine.

  python -m benchmarks.input_pipeline                  # ImageNet-style, generated JPEGs
  python -m benchmarks.input_pipeline --config=configs/fashion_mnist.py

With the ImageNet config (default) it writes `--num_images` random 500×375 JPEGs (the
typical ILSVRC size) as an image folder in a temporary directory and reads them with
the config's augmentation; any other config reads its real dataset.
"""

import os
import tempfile
import time

from absl import app
from absl import flags
from ml_collections import config_flags

from alexnet_jax import input_pipeline
from benchmarks.image_folder import write_image_folder

_NUM_IMAGES = flags.DEFINE_integer('num_images', 512, 'Generated JPEGs (ImageNet config).')
_BATCHES = flags.DEFINE_integer('batches', 20, 'Timed batches, after 2 warm-up batches.')
config_flags.DEFINE_config_file('config', 'configs/imagenet.py', 'Input settings.')


def main(argv):
  del argv
  config = flags.FLAGS.config
  with tempfile.TemporaryDirectory() as root:
    if config.dataset == 'imagenet2012':
      write_image_folder(root, _NUM_IMAGES.value)
      config.update(
        {
          'dataset': 'image_folder',
          'manual_dir': root,
          'test_split': 'val',
          'num_classes': 2,
          'shuffle_buffer': _NUM_IMAGES.value,
        }
      )
    batches = input_pipeline.create_datasets(config).train_batches()
    for _ in range(2):
      next(batches)
    start = time.perf_counter()
    for _ in range(_BATCHES.value):
      next(batches)
    seconds = time.perf_counter() - start
    del batches  # Stop tf.data's prefetching before the folder is deleted.
  images_per_sec = _BATCHES.value * config.batch_size / seconds
  print(
    f'{config.dataset}, {config.image_size} px, crop {config.augment.crop}, '
    f'batch {config.batch_size}, {os.cpu_count()} CPUs: {_BATCHES.value} batches '
    f'in {seconds:.1f} s'
  )
  print(f'images_per_sec={images_per_sec:.1f}')


if __name__ == '__main__':
  app.run(main)
