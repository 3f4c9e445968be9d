"""Classifies image files with a trained checkpoint and prints the top-5 classes.

python -m alexnet_jax.predict --workdir=runs/fashion_mnist shoe.png shirt.jpg
"""

import os
import sys

from absl import app
from absl import flags
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np
import tensorflow as tf

from alexnet_jax import augment
from alexnet_jax import checkpoints
from alexnet_jax import config_lib
from alexnet_jax import datasets
from alexnet_jax import input_pipeline
from alexnet_jax import sharding
from alexnet_jax import steps as steps_lib


def load_image(path: str, config: ml_collections.ConfigDict) -> np.ndarray:
  """The evaluation view of one image file: float32 `[S, S, 3]`, normalised (the
  model's input).

  Raises:
    FileNotFoundError: if `path` does not exist.
    ValueError: if it is not a decodable PNG/JPEG/GIF/BMP image.
  """
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f'No image file {path!r}.')
  if config.prepared:  # A file is an original image, never a prepared copy's.
    config = config.copy_and_resolve_references()
    config.prepared = False
  try:
    pixels = input_pipeline.preprocess_eval(tf.io.read_file(path), config).numpy()
  except tf.errors.InvalidArgumentError as e:
    raise ValueError(f'Cannot decode {path!r} as an image: {e.message}') from e
  return np.asarray(augment.normalize(pixels, (config.pixel_mean, config.pixel_std)))


def predict_files(
  config: ml_collections.ConfigDict, workdir: str, paths: list[str], k: int = 5
) -> list[list[tuple[str, float]]]:
  """Top-`k` (class name, softmax probability) per file, most probable first,
  from the latest checkpoint in `workdir` (`steps.eval_apply` on `config.mesh`).

  Raises:
    FileNotFoundError: for a missing checkpoint or file; ValueError: undecodable file.
    config_lib.ConfigError: if `config.classes` is not the run's.
  """
  config_lib.check_same_classes(config_lib.load(workdir), config, workdir)
  mesh = sharding.create_mesh(config.mesh)
  params, _ = checkpoints.restore_params(config, workdir, mesh)
  images = np.stack([load_image(path, config) for path in paths])
  # The batch splits over the mesh's 'data' axis: pad it to a multiple of its size.
  padded = -len(images) % mesh.shape[sharding.DATA_AXIS]
  images = np.concatenate([images, np.zeros((padded, *images.shape[1:]), images.dtype)])
  _, eval_graphdef = steps_lib.graphdefs(config)
  logits = steps_lib.eval_apply(mesh, eval_graphdef, params)(
    params, sharding.global_batch(mesh, {'image': images})['image']
  )
  probabilities = np.asarray(jax.nn.softmax(logits))[: len(paths)]
  names = datasets.class_names(config)
  top = np.argsort(-probabilities, axis=-1)[:, :k]
  return [[(names[c], float(p[c])) for c in row] for p, row in zip(probabilities, top, strict=True)]


def _config(workdir: str) -> ml_collections.ConfigDict:
  """--config if given, else the run's config.json; its --config.KEY overrides on top
  (`config_lib.for_workdir`)."""
  flag = flags.FLAGS['config']
  given = flag.value if flag.present else None
  return config_lib.for_workdir(workdir, given, dict(flag.override_values))


def main(argv):
  paths = argv[1:]
  if not paths:
    raise app.UsageError('Name one or more image files after the flags.')
  tf.config.experimental.set_visible_devices([], 'GPU')  # tf.data only.
  workdir = flags.FLAGS.workdir
  try:  # What the user must fix (a config, a missing checkpoint or image) in one line.
    config = _config(workdir)
    predictions = predict_files(config, workdir, paths)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f'{type(e).__name__}: {e}')
  for path, top in zip(paths, predictions, strict=True):
    print(path)
    for name, probability in top:
      print(f'  {probability:6.3f}  {name}')


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, "A training run's workdir.", required=True)
  config_flags.DEFINE_config_file(
    'config',
    # Parsed only for the keys that `--config.KEY=VALUE` may set (every config's):
    # without --config the run's own config.json is used, overrides on top.
    os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', 'default.py'
    ),
    "The run's training config file; default: its workdir's config.json. Either "
    'with --config.KEY=VALUE overrides, e.g. --config.mesh.model=1.',
    lock_config=True,
  )
  app.run(main)
