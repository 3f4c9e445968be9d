"""A trained run's pool5/fc6/fc7 activations of a split or image files, as an .npz, and
DeCAF's probe of them: a logistic regression fit on the train split, top-1 on the test.

python -m alexnet_jax.features --workdir=runs/fashion_mnist --layer=fc7 --output=fc7.npz
python -m alexnet_jax.features --workdir=runs/fashion_mnist --layer=fc6 --probe
python -m alexnet_jax.features --workdir=runs/fashion_mnist --output=f.npz shoe.png shirt.jpg
"""

import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np
from sklearn import linear_model
from sklearn import pipeline
from sklearn import preprocessing
import tensorflow as tf

from alexnet_jax import augment
from alexnet_jax import checkpoints
from alexnet_jax import config_lib
from alexnet_jax import files
from alexnet_jax import input_pipeline
from alexnet_jax import models
from alexnet_jax import predict
from alexnet_jax import sharding
from alexnet_jax import steps as steps_lib

# The probe: L2-regularised multinomial logistic regression (lbfgs, scikit-learn's
# default solver and its default C), on features standardised with the train split's
# per-unit mean and std; the limit on iterations is far above what lbfgs needs there.
PROBE_C = 1.0
PROBE_MAX_ITER = 1000


def split_features(
  config: ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
  params,
  layer: str,
  split: str,
) -> tuple[np.ndarray, np.ndarray]:
  """The activations of `layer` for every decodable example of `split`, on every process.

  The split is read as `input_pipeline.create_datasets(config)` reads a test split
  (central crop, the run's resize and mean; its `config.classes`; for the train split
  its `config.train_examples_per_class` subset, the examples trained on) and run through
  `steps.eval_features` (eval mode: no dropout) on `mesh`.

  Returns:
    (features float32 `[N, D]` (see `models.AlexNet.activations`), labels int32
    `[N]`). With several processes, the rows of every process's part, batch by batch.

  Raises:
    FileNotFoundError: if the dataset's files are missing.
    ValueError: for an unknown or empty split.
  """
  config = config.copy_and_resolve_references()
  config.test_split = split
  data = input_pipeline.create_datasets(config, *sharding.data_groups(mesh))
  _, eval_graphdef = steps_lib.graphdefs(config)
  features_fn = steps_lib.eval_features(mesh, eval_graphdef, params, layer)
  features, labels = [], []
  for local_batch in data.test_batches():
    batch = sharding.global_batch(mesh, local_batch)
    images = augment.normalize(batch['image'], (config.pixel_mean, config.pixel_std))
    activations = np.asarray(features_fn(params, images))
    kept = sharding.fetch({'label': batch['label'], 'mask': batch['mask']})
    real = kept['mask'] > 0
    features.append(activations[real])
    labels.append(kept['label'][real])
  if not sum(map(len, labels)):
    raise ValueError(f'{config.dataset} {split} holds no decodable example.')
  features, labels = np.concatenate(features), np.concatenate(labels).astype(np.int32)
  return features, labels


def file_features(
  config: ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
  params,
  layer: str,
  paths: list[str],
) -> np.ndarray:
  """The activations of `layer`, float32 `[len(paths), D]`, of image files read as
  predict reads them (`predict.load_image`), `config.eval_batch_size` at a time.

  Every process reads every file (the batches enter whole, `make_array_from_callback`).

  Raises:
    FileNotFoundError: for a missing file; ValueError: for an undecodable one.
  """
  _, eval_graphdef = steps_lib.graphdefs(config)
  features_fn = steps_lib.eval_features(mesh, eval_graphdef, params, layer)
  data_size = mesh.shape[sharding.DATA_AXIS]
  rows = -(-config.eval_batch_size // data_size) * data_size  # A multiple of 'data'.
  features = []
  for start in range(0, len(paths), rows):
    images = np.stack([predict.load_image(path, config) for path in paths[start : start + rows]])
    padded = np.concatenate(
      [images, np.zeros((-len(images) % data_size, *images.shape[1:]), images.dtype)]
    )
    batch = jax.make_array_from_callback(
      padded.shape, sharding.batch_sharding(mesh), lambda index, x=padded: x[index]
    )
    features.append(np.asarray(features_fn(params, batch))[: len(images)])
  return np.concatenate(features)


def probe(
  train_features: np.ndarray,
  train_labels: np.ndarray,
  test_features: np.ndarray,
  test_labels: np.ndarray,
) -> float:
  """Test top-1 in [0, 1] of a linear classifier fit on the train features, DeCAF's
  measure of features (Donahue et al., ICML 2014, Sec. 4): `PROBE_C`, `PROBE_MAX_ITER`.

  Raises:
    ValueError: if the train labels hold fewer than two classes.
  """
  classifier = pipeline.make_pipeline(
    preprocessing.StandardScaler(),
    linear_model.LogisticRegression(C=PROBE_C, max_iter=PROBE_MAX_ITER),
  )
  classifier.fit(train_features, train_labels)
  return float(classifier.score(test_features, test_labels))


def extract(
  config: ml_collections.ConfigDict,
  workdir: str,
  layer: str,
  *,
  split: str | None = None,
  paths: list[str] | None = None,
  probe_train: bool = False,
) -> dict[str, Any]:
  """The .npz's arrays: `layer`'s activations from the latest checkpoint of `workdir`.

  Every process calls it (restoring and the batches are collective). Of image files
  `paths`, or else of `split` (default `config.test_split`); `probe_train` adds the
  features of `config.train_split` and the `probe`'s top-1 on `split`.

  Returns:
    'features' float32 `[N, D]`, 'labels' int32 `[N]` (-1 for files), 'layer',
    'step' (the checkpoint's); 'paths' for files, else 'split'; with `probe_train`
    also 'train_split', 'train_features', 'train_labels' and 'probe_top1'.

  Raises:
    FileNotFoundError: no checkpoint, dataset files or image file.
    ValueError: an undecodable file, an unknown split (see `split_features`).
  """
  mesh = sharding.create_mesh(config.mesh)
  params, step = checkpoints.restore_params(config, workdir, mesh)
  logging.info('%s of step %d of %s on mesh %s.', layer, step, workdir, dict(mesh.shape))
  results = {'layer': layer, 'step': step}
  if paths:
    features = file_features(config, mesh, params, layer, paths)
    results.update(features=features, labels=np.full(len(paths), -1, np.int32), paths=paths)
    return results
  split = split or config.test_split
  features, labels = split_features(config, mesh, params, layer, split)
  results.update(features=features, labels=labels, split=split)
  if probe_train:
    train_features, train_labels = split_features(config, mesh, params, layer, config.train_split)
    results.update(
      train_split=config.train_split,
      train_features=train_features,
      train_labels=train_labels,
      probe_top1=probe(train_features, train_labels, features, labels),
    )
  return results


def write_npz(path: str, arrays: dict[str, Any]):
  """`np.savez(path, **arrays)` written whole or not at all (`files.replaced`)."""
  with files.replaced(path, 'wb') as f:
    np.savez(f, **arrays)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, a bad flag (e.g. an unknown --layer) named in one line on
  stderr, exit status 1 (absl adds a second line pointing to --help)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.stderr.write(f'FATAL Flags parsing error: {e}\n')
    sys.exit(1)


def main(argv):
  paths = argv[1:]
  args = flags.FLAGS
  if paths and (args.split or args.probe):
    raise app.UsageError('Image files or --split/--probe, not both.')
  if not args.output and not args.probe:
    raise app.UsageError('Pass --output=FILE.npz (or --probe).')
  tf.config.experimental.set_visible_devices([], 'GPU')  # tf.data only.
  try:  # What the user must fix (a config, a missing checkpoint, split or file) in one line.
    config = config_lib.for_workdir(args.workdir, args.config)
    results = extract(
      config, args.workdir, args.layer, split=args.split, paths=paths, probe_train=args.probe
    )
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f'{type(e).__name__}: {e}')
  if jax.process_index() > 0:
    return
  if args.output:
    write_npz(args.output, results)
    logging.info('Wrote %s: %s %s', args.output, args.layer, results['features'].shape)
  if args.probe:
    print(
      f'{args.layer} probe: top-1 {results["probe_top1"]:.4f} on {results["split"]} '
      f'({len(results["labels"])} examples), fit on {config.train_split} '
      f'({len(results["train_labels"])})'
    )


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, "A training run's workdir.", required=True)
  flags.DEFINE_enum('layer', 'fc7', models.FEATURE_LAYERS, 'The layer whose outputs to take.')
  flags.DEFINE_string('split', None, "The split to read; default: the config's test_split.")
  flags.DEFINE_string('output', None, 'The .npz to write (see README); optional with --probe.')
  flags.DEFINE_bool(
    'probe',
    False,
    "Also fit a logistic regression on the train split's features; "
    "print its top-1 on --split's (and write both splits' features to --output).",
  )
  config_flags.DEFINE_config_file(
    'config',
    None,
    "The run's training config file; default: its workdir's config.json.",
    lock_config=True,
  )
  app.run(main, flags_parser=parse_flags)
