"""Tests of the feature extractor against an independent numpy forward pass, and of its
command line (the probe, bad flags)."""

import os

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
import tensorflow as tf
import tensorflow_datasets as tfds
from threadpoolctl import threadpool_limits

from alexnet_jax import config_lib
from alexnet_jax import features
from alexnet_jax import input_pipeline
from alexnet_jax import predict
from configs import fashion_mnist
from helpers import run_module
from helpers import on_devices
from helpers import save_checkpoint

# ---------------------------------------------------------------------------------
# AlexNet's eval-mode forward pass in float64 numpy, NHWC, from the paper (Fig. 2,
# Sec. 3.3-3.5) and cuda-convnet2's LRN (scale / size), not from alexnet_jax.models.
# ---------------------------------------------------------------------------------


def conv(x, kernel, bias, stride=1, pad=0, groups=1):
  """Cross-correlation of `x` [N, H, W, C] with an HWIO kernel; groups > 1 connects
  output group g to input group g only (the towers of conv2, conv4, conv5)."""
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  k = kernel.shape[0]
  patches = sliding_window_view(x, (k, k), axis=(1, 2))[:, ::stride, ::stride]  # n h w c i j
  outputs = [
    np.tensordot(p, w, axes=([4, 5, 3], [0, 1, 2]))
    for p, w in zip(np.split(patches, groups, 3), np.split(kernel, groups, 3), strict=True)
  ]
  return np.concatenate(outputs, -1) + bias


def lrn(a, size=5, k=2.0, alpha=1e-4 / 5, beta=0.75):
  """Across channels within each tower's half of the maps, the window clipped."""
  outputs = []
  for tower in np.split(a, 2, -1):
    squares = np.pad(tower**2, ((0, 0),) * 3 + ((size // 2, size // 2),))
    window = sum(squares[..., i : i + tower.shape[-1]] for i in range(size))
    outputs.append(tower * (k + alpha * window) ** -beta)
  return np.concatenate(outputs, -1)


def max_pool(x):
  return sliding_window_view(x, (3, 3), axis=(1, 2))[:, ::2, ::2].max(axis=(4, 5))


def numpy_alexnet(images, params):
  """{'pool5': [N, s·s·256] in (h, w, c) order, 'fc6', 'fc7' (after ReLU), 'fc8'}."""
  p = {
    name: {k: np.asarray(v, np.float64) for k, v in layer.items()} for name, layer in params.items()
  }
  relu = lambda x: np.maximum(x, 0)
  layer = lambda name, x, **kw: conv(x, p[name]['kernel'], p[name]['bias'], **kw)
  x = max_pool(lrn(relu(layer('conv1', np.asarray(images, np.float64), stride=4))))
  x = max_pool(lrn(relu(layer('conv2', x, pad=2, groups=2))))
  x = relu(layer('conv3', x, pad=1))
  x = relu(layer('conv4', x, pad=1, groups=2))
  x = max_pool(relu(layer('conv5', x, pad=1, groups=2)))
  out = {'pool5': x.reshape(len(x), -1)}
  out['fc6'] = relu(out['pool5'] @ p['fc6']['kernel'] + p['fc6']['bias'])
  out['fc7'] = relu(out['fc6'] @ p['fc7']['kernel'] + p['fc7']['bias'])
  out['fc8'] = out['fc7'] @ p['fc8']['kernel'] + p['fc8']['bias']
  return out


def assert_close(actual, expected):
  assert actual.dtype == np.float32 and actual.shape == expected.shape
  np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


@pytest.fixture
def run(tmp_path, fashion_mnist_as_is):
  """A step-1 checkpoint of a fresh model at 99 px (pool5 2 × 2: its flattening order
  matters) under mock Fashion-MNIST, 6 test images in batches of 4 (the last padded)."""
  del fashion_mnist_as_is
  config = fashion_mnist.get_config()
  config.update(image_size=99, resize_size=99, eval_batch_size=4)
  params = save_checkpoint(config, str(tmp_path), 1)
  with tfds.testing.mock_data(num_examples=6):
    yield config, str(tmp_path), params


@pytest.mark.parametrize('devices', [1, 2])  # Both towers on one device; one per device.
@pytest.mark.slow
def test_split_and_file_features_are_the_numpy_forward_pass(run, tmp_path, monkeypatch, devices):
  config, workdir, params = run
  on_devices(monkeypatch, devices)  # Mesh from the devices present: (1, 1) or (1, 2).
  batches = list(input_pipeline.create_datasets(config).test_batches())
  pixels = np.concatenate([b['image'][b['mask'] > 0] for b in batches])
  images = (pixels - np.float32(config.pixel_mean)) / np.float32(config.pixel_std)
  labels = np.concatenate([b['label'][b['mask'] > 0] for b in batches])
  expected = numpy_alexnet(images, params)
  assert expected['pool5'].shape == (6, 2 * 2 * 256)
  assert (expected['fc7'] == 0).mean() < 0.9  # The ReLUs leave units to compare.
  for layer in ('pool5', 'fc6', 'fc7', 'fc8'):
    results = features.extract(config, workdir, layer)
    assert (results['layer'], results['step'], results['split']) == (layer, 1, 'test')
    np.testing.assert_array_equal(results['labels'], labels)
    assert_close(results['features'], expected[layer])

  paths = []
  for i in range(5):  # Batches of 4 and 1 (padded to the data axis).
    paths.append(str(tmp_path / f'{i}.png'))
    pixels = np.random.RandomState(i).randint(0, 256, (28 + i, 30, 1), np.uint8)
    tf.io.write_file(paths[-1], tf.io.encode_png(pixels))
  results = features.extract(config, workdir, 'fc6', paths=paths)
  assert results['paths'] == paths
  np.testing.assert_array_equal(results['labels'], [-1] * 5)
  loaded = np.stack([predict.load_image(path, config) for path in paths])
  assert_close(results['features'], numpy_alexnet(loaded, params)['fc6'])


@pytest.mark.slow
def test_train_features_are_of_the_examples_trained_on(run):
  """With `train_examples_per_class`, the train split's features are of that subset:
  the first example of each class, in stored order."""
  config, workdir, _ = run
  config.train_examples_per_class = 1
  results = features.extract(config, workdir, 'pool5', split='train')
  stored = tfds.builder('fashion_mnist').as_dataset(
    split='train', read_config=tfds.ReadConfig(interleave_cycle_length=1)
  )
  labels = [int(ex['label']) for ex in tfds.as_numpy(stored)]
  first = [label for i, label in enumerate(labels) if label not in labels[:i]]
  assert 1 < len(first) < len(labels)  # Else the test shows nothing.
  np.testing.assert_array_equal(results['labels'], first)


@pytest.mark.slow
def test_a_missing_checkpoint_is_the_restore_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='No checkpoint in'):
    features.extract(fashion_mnist.get_config(), str(tmp_path), 'fc7')


def run_features(*args):
  # One BLAS/OpenMP thread for scikit-learn: on 2 busy cores two threads make each of
  # lbfgs's iterations 40× slower (spinning), not faster.
  return run_module('alexnet_jax.features', *args, OMP_NUM_THREADS='1', OPENBLAS_NUM_THREADS='1')


@pytest.mark.slow
def test_an_unknown_layer_is_one_line_before_anything_is_read(tmp_path):
  result = run_features(f'--workdir={tmp_path / "none"}', '--layer=conv5', '--output=x.npz')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
    'FATAL Flags parsing error: flag --layer=conv5: value should be one of <pool5|fc6|fc7|fc8>'
  )
  assert 'Traceback' not in result.stderr and 'Pass --help' not in result.stderr


@pytest.mark.slow
def test_probe_is_a_logistic_regression_fit_on_the_written_train_features(
  toy_image_folder, tmp_path
):
  """The command on the image folder (80 train, 37 val images, their class in their
  brightness) on the 2 × 2 mesh of the 4 devices: the .npz's top-1 is that of
  scikit-learn fit here on its train features, and above chance."""
  config = fashion_mnist.get_config()
  config.update(
    dataset='image_folder', manual_dir=toy_image_folder, test_split='val', eval_batch_size=8
  )
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  config_lib.save(config, workdir)
  save_checkpoint(config, workdir, 3)
  output = tmp_path / 'out' / 'fc7.npz'
  result = run_features(f'--workdir={workdir}', '--layer=fc7', '--probe', f'--output={output}')
  assert result.returncode == 0, result.stderr[-3000:]
  with np.load(output) as saved:
    npz = dict(saved)
  assert str(npz['layer']) == 'fc7' and int(npz['step']) == 3
  assert (str(npz['split']), str(npz['train_split'])) == ('val', 'train')
  assert npz['features'].shape == (37, 4096) and npz['train_features'].shape == (80, 4096)
  assert npz['features'].dtype == np.float32 and npz['labels'].dtype == np.int32
  assert sorted(np.bincount(npz['train_labels'])) == [8] * 10
  assert sorted(np.bincount(npz['labels'])) == [3] * 3 + [4] * 7
  classifier = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
  with threadpool_limits(1):
    classifier.fit(npz['train_features'], npz['train_labels'])
  top1 = classifier.score(npz['features'], npz['labels'])
  assert float(npz['probe_top1']) == pytest.approx(top1, abs=1e-12)
  assert 0.5 < top1 <= 1.0, top1  # Chance: 0.1.
  assert f'fc7 probe: top-1 {top1:.4f} on val (37 examples), fit on train (80)' in result.stdout
