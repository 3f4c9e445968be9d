"""Tests of data preparation and augmentation."""

import os

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from alexnet_jax import datasets
from alexnet_jax import input_pipeline
from configs import fashion_mnist
from configs import imagenet

DEBIAN_FASHION_MNIST = '/usr/share/datasets/fashion-mnist'


def test_fashion_mnist_builds_from_debian_files(tmp_path):
  builder = datasets.prepare_fashion_mnist(str(tmp_path), DEBIAN_FASHION_MNIST)
  assert builder.info.splits['train'].num_examples == 60_000
  assert builder.info.splits['test'].num_examples == 10_000
  # The decoded data were checked when prepared; a second call reuses them.
  assert datasets.prepare_fashion_mnist(
      str(tmp_path), '/nonexistent').data_dir == builder.data_dir


def test_missing_fashion_mnist_files_say_how_to_get_them(tmp_path):
  with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist'):
    datasets.prepare_fashion_mnist(str(tmp_path), str(tmp_path / 'missing'))


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


def write_jpeg(path, image, mode=None):
  image = Image.fromarray(image)
  (image.convert(mode) if mode else image).save(path, 'JPEG')


@pytest.fixture
def image_folder(tmp_path):
  """train/ and val/ with 3 classes of 40×30 JPEGs and one corrupt file each; val also
  holds one grayscale and one CMYK image."""
  rng = np.random.RandomState(0)
  for split, per_class in (('train', 4), ('val', 3)):
    for label in ('cat', 'dog', 'owl'):
      os.makedirs(tmp_path / split / label)
      for i in range(per_class):
        write_jpeg(tmp_path / split / label / f'{i}.jpg',
                   rng.randint(0, 256, (30, 40, 3), np.uint8))
  write_jpeg(tmp_path / 'val' / 'cat' / 'gray.jpg', rng.randint(0, 256, (30, 40), np.uint8))
  write_jpeg(tmp_path / 'val' / 'dog' / 'cmyk.jpg',
             rng.randint(0, 256, (30, 40, 3), np.uint8), mode='CMYK')
  for split in ('train', 'val'):
    (tmp_path / split / 'owl' / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff not a jpeg')
  return tmp_path


def folder_config(root, **overrides):
  config = imagenet.get_config()
  config.update({'dataset': 'image_folder', 'manual_dir': str(root), 'test_split': 'val',
                 'num_classes': 3, 'image_size': 67, 'resize_size': 75, 'batch_size': 4,
                 'eval_batch_size': 4, 'shuffle_buffer': 12, **overrides})
  return config


def test_image_folder_skips_and_counts_a_corrupt_image(image_folder, caplog):
  data = input_pipeline.create_datasets(folder_config(image_folder))
  assert data.num_train_examples == 13 and data.num_test_examples == 12
  batches = list(data.test_batches())
  masks = np.concatenate([b['mask'] for b in batches])
  assert masks.sum() == 11  # 9 + grayscale + CMYK; the corrupt file is left out.
  assert all(b['image'].shape == (4, 67, 67, 3) and b['image'].dtype == np.float32
             for b in batches)
  assert 'test: skipped 1 undecodable image(s)' in caplog.text


@pytest.mark.parametrize('crop', ['paper', 'inception'])
def test_image_folder_train_batches(image_folder, crop, caplog):
  config = folder_config(image_folder)
  config.augment.crop = crop
  data = input_pipeline.create_datasets(config)
  batches = data.train_batches()
  batch = next(batches)
  for _ in range(3):  # Past the corrupt file, whatever the shuffle.
    next(batches)
  assert 'train: skipped 1 undecodable image(s)' in caplog.text
  assert batch['image'].shape == (4, 67, 67, 3) and batch['image'].dtype == np.float32
  assert set(batch) == {'image', 'label'} and set(batch['label']) <= {0, 1, 2}
  # Pixels in 0-255 minus the ImageNet mean, plus a PCA-lighting offset.
  assert -200 < batch['image'].min() and batch['image'].max() < 200


def test_wrong_class_count_says_which(image_folder):
  with pytest.raises(ValueError, match='set --config.num_classes=3'):
    input_pipeline.create_datasets(folder_config(image_folder, num_classes=1000))


def test_inception_crop_is_a_resized_window_of_the_image():
  image = np.random.RandomState(1).randint(0, 256, (60, 80, 3), np.uint8)
  encoded = tf.io.encode_png(image)  # The non-JPEG path crops after decoding.
  crops = [input_pipeline.inception_crop(encoded, 32, tf.constant([2, i])).numpy()
           for i in range(5)]
  for out in crops:
    assert out.shape == (32, 32, 3)
    assert 0 <= out.min() and out.max() <= 255  # Bilinear: no overshoot.
  assert not np.allclose(crops[0], crops[1])
  np.testing.assert_array_equal(
      crops[0], input_pipeline.inception_crop(encoded, 32, tf.constant([2, 0])).numpy())
