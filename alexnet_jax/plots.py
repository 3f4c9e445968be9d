"""Pictures of a run: learning curves, conv1 filters (paper Fig. 3), predictions, confusion.

`python -m alexnet_jax.plots --workdir=DIR [--config=CONFIG]` redraws them all from the
workdir's metrics and latest checkpoint; main.py draws them to `DIR/plots/` after training.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from flax import nnx
import jax
from matplotlib.figure import Figure
import ml_collections
from ml_collections import config_flags
import numpy as np

from alexnet_jax import augment
from alexnet_jax import checkpoints
from alexnet_jax import config_lib
from alexnet_jax import files
from alexnet_jax import models
from alexnet_jax import sharding
from alexnet_jax import steps as steps_lib

DPI = 100  # Figure sizes are in inches: pixels = inches * DPI.
# Larger confusion matrices are unreadable; ImageNet's would be 1000×1000.
MAX_CONFUSION_CLASSES = 20
GRID_ROWS, GRID_COLS = 4, 8  # Prediction grid.


def save(fig: Figure, path: str) -> str:
  """Writes `fig` as a PNG of exactly figsize * DPI pixels (Agg, no display needed),
  whole or not at all (`files.replaced`)."""
  with files.replaced(path, 'wb') as f:
    fig.savefig(f, dpi=DPI, format='png')
  return path


def read_metrics(workdir: str) -> tuple[list[dict], list[dict]]:
  """The train and the test lines of `workdir/metrics.jsonl`, in file order (a line
  torn by a kill is skipped with a warning, `files.read_jsonl`)."""
  rows = files.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  return ([r for r in rows if 'train_loss' in r], [r for r in rows if 'test_loss' in r])


def learning_curves(train_rows: list[dict], test_rows: list[dict], title: str) -> Figure:
  """Train and test loss (left) and top-1 (right) vs epoch, from `read_metrics`'s rows;
  1200×450 px."""
  fig = Figure(figsize=(12, 4.5))
  for ax, metric, panel in zip(
    fig.subplots(1, 2), ('loss', 'top1'), ('cross-entropy loss', 'top-1 accuracy'), strict=True
  ):
    for rows, split, style in ((train_rows, 'train', '-'), (test_rows, 'test', 'o-')):
      if rows:
        ax.plot(
          [r['epoch'] for r in rows], [r[f'{split}_{metric}'] for r in rows], style, label=split
        )
    ax.set(xlabel='epoch', title=panel)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  return fig


def conv1_mosaic(
  kernel: np.ndarray, gap: int = 1, tower_gap: int = 4, towers: int = models.NUM_TOWERS
) -> np.ndarray:
  """Lays out conv1's kernels as in the paper's Fig. 3.

  Args:
    kernel: `[k, k, 3, C]` (AlexNet: 11, 11, 3, 96; torchvision's: 64); with two
      towers output channels `[:C // 2]` are tower 0, shown in the top half, tower
      1's in the bottom half.
    gap: background pixels between kernels.
    tower_gap: background pixels between the two towers' blocks.
    towers: 2 for the paper's AlexNet, 1 for a one-column network (one block).

  Returns:
    float32 RGB `[H, W, 3]` in [0, 1]: each tower's kernels in rows of 12 (8 for
    one tower: torchvision's 64 as 8 × 8), row by row, each contrast-normalised to its
    own min..max; background 1 (white).

  Raises:
    ValueError: if `kernel` is not `[k, k, 3, C]` with C divisible by `towers` × the
      row length.
  """
  k, _, channels, count = kernel.shape
  cols = 12 if towers > 1 else 8
  if kernel.shape[1] != k or channels != 3 or count % (towers * cols):
    raise ValueError(
      f'Expected a [k, k, 3, C] kernel with C a multiple of {towers * cols}, got {kernel.shape}.'
    )
  rows = count // towers // cols  # Per tower.
  kernel = np.asarray(kernel, np.float32)
  low = kernel.min(axis=(0, 1, 2), keepdims=True)
  high = kernel.max(axis=(0, 1, 2), keepdims=True)
  kernel = (kernel - low) / np.maximum(high - low, 1e-12)
  cell = k + gap
  tower_height = rows * cell + gap
  height = towers * tower_height + (towers - 1) * tower_gap
  mosaic = np.ones((height, cols * cell + gap, 3), np.float32)
  for index in range(count):
    tower, within = divmod(index, count // towers)
    row, col = divmod(within, cols)
    top = tower * (tower_height + tower_gap) + gap + row * cell
    left = gap + col * cell
    mosaic[top : top + k, left : left + k] = kernel[..., index]
  return mosaic


def conv1_filters(kernel: np.ndarray, title: str = '', towers: int = models.NUM_TOWERS) -> Figure:
  """conv1's kernels `[11, 11, 3, C]` as in Fig. 3 (`conv1_mosaic`), tower 0 on top;
  1200×900 px."""
  mosaic = conv1_mosaic(kernel, towers=towers)
  fig = Figure(figsize=(12, 9))
  ax = fig.add_axes((0.08, 0.02, 0.9, 0.9))
  ax.imshow(mosaic, interpolation='nearest')
  ax.set_xticks([])
  if towers == models.NUM_TOWERS:
    half = mosaic.shape[0] / 2
    ax.set_yticks([half / 2, half * 1.5], ['tower 0\n(GPU 1)', 'tower 1\n(GPU 2)'])
  else:
    ax.set_yticks([])
  for side in ax.spines.values():
    side.set_visible(False)
  fig.suptitle(
    title
    or f'conv1: {kernel.shape[-1]} kernels of '
    f'{kernel.shape[0]}×{kernel.shape[1]}×3, each contrast-normalised'
  )
  return fig


def predictions(
  images: np.ndarray, labels: np.ndarray, probs: np.ndarray, class_names: list[str]
) -> Figure:
  """The first 4 × 8 test images with predicted and true labels; 1600×900 px.

  Args:
    images: uint8 `[N, H, W, 3]`.
    labels: int `[N]` true classes.
    probs: float `[N, num_classes]` softmax outputs.
    class_names: one name per class.

  Wrong predictions have a red title and frame.
  """
  fig = Figure(figsize=(16, 9))
  for ax, image, label, p in zip(
    fig.subplots(GRID_ROWS, GRID_COLS).flat, images, labels, probs, strict=False
  ):
    predicted = int(np.argmax(p))
    color = 'tab:green' if predicted == label else 'red'
    ax.imshow(image, interpolation='nearest')
    ax.set_title(
      f'{class_names[predicted]} ({p[predicted]:.2f})\ntrue: {class_names[label]}',
      color=color,
      fontsize=9,
    )
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ax.spines.values():
      side.set(color=color, linewidth=1 if predicted == label else 3)
  fig.suptitle('predicted (probability) / true label; wrong in red')
  # Room for the two-line titles: tight_layout lets them touch the row above.
  fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9, wspace=0.1, hspace=0.35)
  return fig


def confusion_counts(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """int64 `[num_classes, num_classes]`: row = true class, column = predicted class."""
  counts = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(counts, (labels, predictions), 1)
  return counts


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, class_names: list[str]) -> Figure:
  """Counts, coloured by each true class's fraction; 900×800 px.

  Raises:
    ValueError: for more than `MAX_CONFUSION_CLASSES` classes.
  """
  n = len(class_names)
  if n > MAX_CONFUSION_CLASSES:
    raise ValueError(
      f'{n} classes: a confusion matrix is drawn for at most {MAX_CONFUSION_CLASSES}.'
    )
  counts = confusion_counts(labels, predicted, n)
  fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
  fig = Figure(figsize=(9, 8))
  ax = fig.subplots()
  ax.imshow(fractions, cmap='Blues', vmin=0, vmax=1)
  for (i, j), count in np.ndenumerate(counts):
    ax.text(
      j,
      i,
      str(count),
      ha='center',
      va='center',
      fontsize=8,
      color='white' if fractions[i, j] > 0.5 else 'black',
    )
  ax.set_xticks(range(n), class_names, rotation=45, ha='right')
  ax.set_yticks(range(n), class_names)
  ax.set(
    xlabel='predicted',
    ylabel='true',
    title=f'confusion on {counts.sum()} test images, '
    f'top-1 {np.trace(counts) / max(counts.sum(), 1):.4f}',
  )
  fig.tight_layout()
  return fig


def predict(
  config: ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
  eval_graphdef: nnx.GraphDef,
  params,
  max_examples: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Eval-mode predictions on the test split (`steps.eval_apply`), on every process.

  Returns:
    (images uint8 `[N, S, S, 3]` as the model saw them, before normalisation;
    labels int32 `[N]`; softmax probabilities float32 `[N, num_classes]`), for the
    first `max_examples` test examples, or all of them if None. With several
    processes, the rows of every process's part, batch by batch.
  """
  from alexnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top

  logits_fn = steps_lib.eval_apply(mesh, eval_graphdef, params)
  normalization = (config.pixel_mean, config.pixel_std)
  data = input_pipeline.create_datasets(config, *sharding.data_groups(mesh))
  images, labels, probs, seen = [], [], [], 0
  for local_batch in data.test_batches():
    batch = sharding.global_batch(mesh, local_batch)
    logits = np.asarray(logits_fn(params, augment.normalize(batch['image'], normalization)))
    batch = sharding.fetch(batch)
    real = batch['mask'] > 0
    images.append(batch['image'][real])
    labels.append(batch['label'][real])
    probs.append(np.asarray(jax.nn.softmax(logits[real])))
    seen += int(real.sum())
    if max_examples is not None and seen >= max_examples:
      break
  stop = max_examples if max_examples is not None else seen
  return (
    np.concatenate(images)[:stop],
    np.concatenate(labels)[:stop],
    np.concatenate(probs)[:stop],
  )


def write_all(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """Draws every picture of the run in `workdir` to `workdir/plots/`; returns the paths.

  Every process of a job calls it (restoring and predicting are collective); only
  process 0 writes. The confusion matrix needs a pass over the whole test split and
  is drawn only for at most `MAX_CONFUSION_CLASSES` classes; the prediction grid
  reads one batch.

  Raises:
    config_lib.ConfigError: if `config.classes` is not the run's.
    FileNotFoundError: without a checkpoint.
  """
  from alexnet_jax import datasets  # pylint: disable=g-import-not-at-top

  config_lib.check_same_classes(config_lib.load(workdir), config, workdir)
  mesh = sharding.create_mesh(config.mesh)
  params, step = checkpoints.restore_params(config, workdir, mesh)
  conv1 = sharding.fetch(params['conv1']['kernel'])
  towers = steps_lib.num_towers(config)
  names = datasets.class_names(config)
  full = len(names) <= MAX_CONFUSION_CLASSES
  _, eval_graphdef = steps_lib.graphdefs(config)
  images, labels, probs = predict(
    config, mesh, eval_graphdef, params, None if full else GRID_ROWS * GRID_COLS
  )
  if jax.process_index() > 0:
    return []
  figures = {
    'learning_curves': learning_curves(
      *read_metrics(workdir), os.path.basename(os.path.normpath(workdir))
    ),
    'conv1_filters': conv1_filters(conv1, _conv1_title(step, towers), towers),
    'predictions': predictions(images, labels, probs, names),
  }
  if full:
    figures['confusion_matrix'] = confusion_matrix(labels, probs.argmax(-1), names)
  paths = [
    save(fig, os.path.join(workdir, 'plots', f'{name}.png')) for name, fig in figures.items()
  ]
  for path in paths:
    logging.info('Wrote %s', path)
  return paths


def _conv1_title(step: int, towers: int) -> str:
  where = 'tower 0 (top), tower 1 (bottom), ' if towers > 1 else ''
  return f'conv1 filters at step {step}: {where}each contrast-normalised'


def _config(workdir: str) -> ml_collections.ConfigDict:
  """--config if given, else the run's config.json; its --config.KEY overrides on top
  (`config_lib.for_workdir`)."""
  flag = flags.FLAGS['config']
  given = flag.value if flag.present else None
  return config_lib.for_workdir(workdir, given, dict(flag.override_values))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tf.config.experimental.set_visible_devices([], 'GPU')  # tf.data only.
  workdir = flags.FLAGS.workdir
  try:  # What the user must fix (a config, a missing run) in one line.
    write_all(_config(workdir), workdir)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f'{type(e).__name__}: {e}')


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
