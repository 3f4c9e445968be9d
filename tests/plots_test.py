"""Tests of the pictures: layouts against hand-computed positions, PNG sizes, a tiny workdir."""

import itertools
import json
import os
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
import tensorflow_datasets as tfds

from alexnet_jax import checkpoints
from alexnet_jax import input_pipeline
from alexnet_jax import plots
from alexnet_jax import steps
from configs import fashion_mnist
from helpers import REPO
from helpers import TIMEOUT
from helpers import mesh_of
from helpers import save_checkpoint


def png_size(path):
  """(height, width) of a non-empty PNG."""
  assert os.path.getsize(path) > 0
  return matplotlib.image.imread(path).shape[:2]


def red_pixels(path):
  image = matplotlib.image.imread(path)
  return int(np.sum((image[..., 0] > 0.9) & (image[..., 1] < 0.1) & (image[..., 2] < 0.1)))


def write_metrics(workdir, epochs=3):
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    for e in range(1, epochs + 1):
      f.write(
        json.dumps(
          {
            'step': 10 * e,
            'epoch': e,
            'train_loss': 2 / e,
            'train_top1': 0.3 * e,
            'train_top5': 0.9,
            'train_images_per_sec': 1.0,
            'learning_rate': 0.1,
          }
        )
        + '\n'
      )
      f.write(
        json.dumps(
          {
            'step': 10 * e,
            'epoch': e,
            'test_loss': 2.5 / e,
            'test_top1': 0.25 * e,
            'test_top5': 0.8,
          }
        )
        + '\n'
      )


def test_read_metrics_splits_train_and_test_lines_and_skips_a_torn_one(tmp_path, caplog):
  write_metrics(tmp_path)
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 40, "epoch": 4, "train_lo')  # Torn by a kill -9 during the append.
  train_rows, test_rows = plots.read_metrics(str(tmp_path))
  assert [r['train_loss'] for r in train_rows] == [2.0, 1.0, 2 / 3]
  assert [r['test_top1'] for r in test_rows] == [0.25, 0.5, 0.75]
  assert 'Skipping line 7 of' in caplog.text


def test_learning_curves_plot_the_metrics_against_epochs(tmp_path):
  write_metrics(tmp_path)
  fig = plots.learning_curves(*plots.read_metrics(str(tmp_path)), 'run')
  assert fig._suptitle.get_text() == 'run'  # pylint: disable=protected-access
  loss_ax, top1_ax = fig.axes
  assert (loss_ax.get_title(), top1_ax.get_title()) == ('cross-entropy loss', 'top-1 accuracy')
  for ax, metric in ((loss_ax, 'loss'), (top1_ax, 'top1')):
    train_line, test_line = ax.lines
    assert train_line.get_label() == 'train' and test_line.get_label() == 'test'
    train = {'loss': [2.0, 1.0, 2 / 3], 'top1': [0.3, 0.6, 0.9]}[metric]
    test = {'loss': [2.5, 1.25, 2.5 / 3], 'top1': [0.25, 0.5, 0.75]}[metric]
    np.testing.assert_allclose(train_line.get_xydata(), np.c_[[1, 2, 3], train])
    np.testing.assert_allclose(test_line.get_xydata(), np.c_[[1, 2, 3], test])
  path = plots.save(fig, str(tmp_path / 'curves.png'))
  assert png_size(path) == (450, 1200)


def test_conv1_mosaic_puts_tower_0_on_top_and_normalises_each_kernel():
  ramp = np.arange(121, dtype=np.float32).reshape(11, 11) / 120  # 0..1.
  kernel = np.zeros((11, 11, 3, 96), np.float32)
  for c in range(96):
    # Tower 0 red, tower 1 blue; each kernel at its own scale and offset.
    kernel[..., 0 if c < 48 else 2, c] = (c + 1) * ramp
    kernel[..., c] -= 5.0 * c
  mosaic = plots.conv1_mosaic(kernel)
  # 4 rows of 12 kernels per tower, 11 px + 1 px gap each, 4 px between the towers.
  assert mosaic.shape == (2 * (4 * 12 + 1) + 4, 12 * 12 + 1, 3)
  red = np.stack([ramp, 0 * ramp, 0 * ramp], -1)
  blue = np.stack([0 * ramp, 0 * ramp, ramp], -1)
  tower1_top = 4 * 12 + 1 + 4 + 1
  for c, top, left, expected in [
    (0, 1, 1, red),
    (13, 13, 13, red),
    (47, 37, 133, red),
    (48, tower1_top, 1, blue),
    (95, tower1_top + 36, 133, blue),
  ]:
    np.testing.assert_allclose(
      mosaic[top : top + 11, left : left + 11], expected, atol=1e-6, err_msg=f'kernel {c}'
    )
  np.testing.assert_array_equal(mosaic[0], 1.0)  # White gap rows.
  np.testing.assert_array_equal(mosaic[tower1_top - 5 : tower1_top], 1.0)


def test_conv1_mosaic_rejects_other_shapes():
  with pytest.raises(ValueError, match='kernel'):
    plots.conv1_mosaic(np.zeros((11, 11, 3, 50)))


def test_conv1_filters_show_the_mosaic():
  kernel = np.random.RandomState(0).randn(11, 11, 3, 96).astype(np.float32)
  [ax] = plots.conv1_filters(kernel).axes
  np.testing.assert_array_equal(ax.images[0].get_array(), plots.conv1_mosaic(kernel))
  assert [t.get_text() for t in ax.get_yticklabels()] == ['tower 0\n(GPU 1)', 'tower 1\n(GPU 2)']


def fake_predictions(num_wrong):
  rng = np.random.RandomState(0)
  labels = rng.randint(0, 10, 32)
  predicted = labels.copy()
  predicted[:num_wrong] = (labels[:num_wrong] + 1) % 10
  probs = np.full((32, 10), 0.02, np.float32)
  probs[np.arange(32), predicted] = 0.82
  grey = rng.randint(0, 256, (32, 67, 67, 1)).astype(np.uint8).repeat(3, axis=-1)
  return grey, labels, probs


def test_prediction_grid_titles_and_marks_wrong_predictions_in_red(tmp_path):
  names = [f'class {i}' for i in range(10)]
  images, labels, probs = fake_predictions(3)
  fig = plots.predictions(images, labels, probs, names)
  for i, ax in enumerate(fig.axes):
    predicted = (labels[i] + 1) % 10 if i < 3 else labels[i]
    assert ax.get_title() == f'class {predicted} (0.82)\ntrue: class {labels[i]}'
    assert ax.title.get_color() == ('red' if i < 3 else 'tab:green')
    np.testing.assert_array_equal(ax.images[0].get_array(), images[i])
  path = plots.save(fig, str(tmp_path / 'wrong.png'))
  assert png_size(path) == (900, 1600)
  assert red_pixels(path) > 3 * 4 * 100  # Three thick frames, at least.


def test_confusion_counts():
  counts = plots.confusion_counts(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 0, 2]), 3)
  np.testing.assert_array_equal(counts, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])


def test_confusion_matrix_shows_counts_coloured_by_fraction():
  labels = np.array([0, 0, 1, 2, 2, 2, 2])
  predicted = np.array([0, 1, 1, 2, 0, 2, 2])
  [ax] = plots.confusion_matrix(labels, predicted, ['a', 'b', 'c']).axes
  assert [t.get_text() for t in ax.texts] == ['1', '1', '0', '0', '1', '0', '1', '0', '3']
  np.testing.assert_allclose(ax.images[0].get_array(), [[0.5, 0.5, 0], [0, 1, 0], [0.25, 0, 0.75]])
  assert ax.get_title() == 'confusion on 7 test images, top-1 0.7143'
  with pytest.raises(ValueError, match='at most 20'):
    plots.confusion_matrix(labels, labels, [str(i) for i in range(21)])


@pytest.fixture
def tiny_workdir(tmp_path, fashion_mnist_as_is, one_device):
  """Fake metrics and a real (untrained) checkpoint at step 7, under mock Fashion-MNIST."""
  del fashion_mnist_as_is, one_device
  config = fashion_mnist.get_config()
  config.eval_batch_size = 16
  params = save_checkpoint(config, str(tmp_path), 7, seed=3)
  write_metrics(tmp_path)
  with tfds.testing.mock_data(num_examples=40):
    yield config, str(tmp_path), params


def test_write_all_draws_every_picture_from_a_workdir(tiny_workdir):
  config, workdir, saved = tiny_workdir
  params, step = checkpoints.restore_params(config, workdir, mesh_of(1, 1))
  assert step == 7
  np.testing.assert_array_equal(params['conv1']['kernel'], saved['conv1']['kernel'])

  paths = plots.write_all(config, workdir)
  names = ['learning_curves', 'conv1_filters', 'predictions', 'confusion_matrix']
  assert paths == [os.path.join(workdir, 'plots', f'{n}.png') for n in names]
  assert [png_size(p) for p in paths] == [(450, 1200), (900, 1200), (900, 1600), (800, 900)]
  drawn = matplotlib.image.imread(paths[1])[..., :3]
  assert np.abs(drawn - drawn.mean()).max() > 0.2  # The filters, not a blank page.


def test_predict_returns_the_test_images_as_the_model_saw_them(tiny_workdir):
  config, workdir, _ = tiny_workdir
  mesh = mesh_of(1, 1)
  params, _ = checkpoints.restore_params(config, workdir, mesh)
  _, graphdef = steps.graphdefs(config)
  images, labels, probs = plots.predict(config, mesh, graphdef, params, max_examples=20)
  assert images.shape == (20, 67, 67, 3) and images.dtype == np.uint8
  assert labels.shape == (20,)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  batches = list(itertools.islice(input_pipeline.create_datasets(config).test_batches(), 2))
  first_32 = {k: np.concatenate([b[k] for b in batches]) for k in ('image', 'label')}
  np.testing.assert_array_equal(images, first_32['image'][:20])
  np.testing.assert_array_equal(labels, first_32['label'][:20])
  _, _, all_probs = plots.predict(config, mesh, graphdef, params)
  assert len(all_probs) == 40


_SAVE_WITH_A_FILE_SIZE_LIMIT = """
import resource, signal, sys
from matplotlib.figure import Figure
from alexnet_jax import plots
from launch import results
# A write past the limit fails (EFBIG) where it stands, as a kill would stop it.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))
figure = Figure(figsize=(4, 3))
figure.subplots().plot(range(100))
writes = {
  'plots.png': lambda path: plots.save(figure, path),
  'test_top1.png': lambda path: results.plot_curves(
    [{'name': 'a', 'curve': [(1, 0.5), (2, 0.6)]}], path, 'sweep'
  ),
}
for name, write in writes.items():
  try:
    write(f'{sys.argv[1]}/{name}')
  except OSError as e:
    print(name, e.strerror)
"""


@pytest.mark.slow
def test_a_png_cut_short_by_a_kill_leaves_the_old_one(tmp_path):
  """A picture (the run's plots, a sweep's test_top1.png) that dies half-way through
  its write (here: at 2,000 bytes) leaves the previous one whole: readers never see
  half a PNG."""
  old = b'\x89PNG the previous picture'
  names = ['plots.png', 'test_top1.png']
  for name in names:
    (tmp_path / name).write_bytes(old)
  result = subprocess.run(
    [sys.executable, '-c', _SAVE_WITH_A_FILE_SIZE_LIMIT, str(tmp_path)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=TIMEOUT,
    check=False,
  )
  assert result.stdout.splitlines() == [f'{name} File too large' for name in names], result.stderr
  assert [(tmp_path / name).read_bytes() for name in names] == [old, old]
  assert sorted(os.listdir(tmp_path)) == names  # No temporary file left.
