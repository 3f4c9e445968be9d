"""Tests of data preparation and augmentation."""

import os

import numpy as np
import pytest
import tensorflow as tf

from alexnet_jax import input_pipeline
from configs import fashion_mnist
from configs import imagenet

DEBIAN_FASHION_MNIST = '/usr/share/datasets/fashion-mnist'


def test_fashion_mnist_builds_from_debian_files(tmp_path):
  builder = input_pipeline.prepare_fashion_mnist(str(tmp_path), DEBIAN_FASHION_MNIST)
  assert builder.info.splits['train'].num_examples == 60_000
  assert builder.info.splits['test'].num_examples == 10_000
  # The decoded data were checked when prepared; a second call reuses them.
  assert input_pipeline.prepare_fashion_mnist(
      str(tmp_path), '/nonexistent').data_dir == builder.data_dir


def test_missing_fashion_mnist_files_say_how_to_get_them(tmp_path):
  with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist'):
    input_pipeline.prepare_fashion_mnist(str(tmp_path), str(tmp_path / 'missing'))


def encode_png(image: np.ndarray) -> tf.Tensor:
  return tf.io.encode_png(image)


def test_train_preprocessing_is_deterministic_and_flips_half_the_time():
  config = fashion_mnist.get_config()
  image = np.random.RandomState(0).randint(0, 256, (28, 28, 1), np.uint8)
  encoded = encode_png(image)
  plain = input_pipeline.preprocess_eval(encoded, config).numpy()
  assert plain.shape == (67, 67, 3) and plain.dtype == np.float32
  flips = 0
  for i in range(200):
    seed = tf.constant([0, i], tf.int64)
    out = input_pipeline.preprocess_train(encoded, seed, config).numpy()
    np.testing.assert_array_equal(
        out, input_pipeline.preprocess_train(encoded, seed, config).numpy())
    if np.array_equal(out, plain[:, ::-1]):
      flips += 1
    else:
      np.testing.assert_array_equal(out, plain)
  assert 70 < flips < 130


def test_normalize_uses_config_statistics():
  config = fashion_mnist.get_config()
  encoded = encode_png(np.full((28, 28, 1), 72, np.uint8))
  out = input_pipeline.preprocess_eval(encoded, config).numpy()
  np.testing.assert_allclose(out, (72 - 72.94) / 90.02, rtol=1e-5)


def test_random_crop_stays_inside_the_image():
  image = tf.reshape(tf.range(10 * 12 * 3, dtype=tf.float32), (10, 12, 3))
  for i in range(20):
    crop = input_pipeline.random_crop(image, 7, tf.constant([1, i])).numpy()
    top, left = np.argwhere(image.numpy()[..., 0] == crop[0, 0, 0])[0]
    np.testing.assert_array_equal(crop, image.numpy()[top:top + 7, left:left + 7])


def test_pca_lighting_adds_one_offset_per_image():
  image = tf.zeros((5, 5, 3))
  out = input_pipeline.pca_lighting(image, 0.1, tf.constant([0, 1])).numpy()
  np.testing.assert_allclose(out, np.broadcast_to(out[0, 0], out.shape))
  assert np.abs(out[0, 0]).max() > 0


def test_pca_lighting_covariance_matches_eigendecomposition():
  v = np.array(input_pipeline.IMAGENET_EIGVECS)
  lam = np.array(input_pipeline.IMAGENET_EIGVALS) * 255
  pixel = tf.zeros((1, 1, 3))
  offsets = np.stack([input_pipeline.pca_lighting(pixel, 0.1, tf.constant([7, i]))
                      .numpy()[0, 0] for i in range(4000)])
  expected = v @ np.diag((0.1 * lam) ** 2) @ v.T
  np.testing.assert_allclose(np.cov(offsets.T), expected, atol=0.1 * expected.max())


def test_pad_batch_masks_padding():
  batch = {'image': np.ones((3, 2, 2, 3), np.float32), 'label': np.arange(3, dtype=np.int32)}
  padded = input_pipeline.pad_batch(batch, 5)
  assert padded['image'].shape == (5, 2, 2, 3)
  np.testing.assert_array_equal(padded['mask'], [1, 1, 1, 0, 0])
  np.testing.assert_array_equal(padded['label'], [0, 1, 2, 0, 0])


def test_missing_imagenet_tars_name_the_files(tmp_path):
  config = imagenet.get_config()
  config.data_dir = str(tmp_path / 'tfds')
  config.manual_dir = str(tmp_path / 'manual')
  with pytest.raises(FileNotFoundError, match='ILSVRC2012_img_train.tar'):
    input_pipeline.create_datasets(config)
