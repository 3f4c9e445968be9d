"""Tests of data preparation, augmentation and the order of batches."""

import itertools
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

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
  assert datasets.prepare_fashion_mnist(str(tmp_path), '/nonexistent').data_dir == builder.data_dir
  # Two groups of processes read disjoint halves (TFDS even splits): the README run's
  # 10,000 test images are all counted, in equal numbers of batches.
  config = fashion_mnist.get_config()
  config.update(data_dir=str(tmp_path), manual_dir='/nonexistent', eval_batch_size=2000)
  parts = [input_pipeline.create_datasets(config, part, 2) for part in (0, 1)]
  assert parts[0].num_train_examples == 60_000 and parts[0].steps_per_epoch == 468
  counts = [[int(b['mask'].sum()) for b in p.test_batches()] for p in parts]
  assert counts == [[1000] * 5, [1000] * 5]


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
      out, input_pipeline.preprocess_train(encoded, seed, config).numpy()
    )
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


def test_pad_rescale_puts_the_whole_image_inside_a_black_frame():
  config = fashion_mnist.get_config()
  config.update(resize='pad', image_size=67, resize_size=79)
  image = tf.fill((28, 28, 3), 200.0)
  out = input_pipeline.rescale(image, config).numpy()
  expected = np.zeros((79, 79, 3), np.float32)
  expected[6:73, 6:73] = 200.0  # 67 px of image, 6 px of 0 on every side.
  np.testing.assert_allclose(out, expected, atol=1e-3)


def test_random_crop_stays_inside_the_image():
  image = tf.reshape(tf.range(10 * 12 * 3, dtype=tf.float32), (10, 12, 3))
  for i in range(20):
    crop = input_pipeline.random_crop(image, 7, tf.constant([1, i])).numpy()
    top, left = np.argwhere(image.numpy()[..., 0] == crop[0, 0, 0])[0]
    np.testing.assert_array_equal(crop, image.numpy()[top : top + 7, left : left + 7])


# fb.resnet.torch datasets/imagenet.lua `pca`: eigenvalues and eigenvectors (columns) of
# the ImageNet RGB covariance on the [0, 1] scale; typed here, not read from the module.
PCA_EIGVAL = np.array([0.2175, 0.0188, 0.0045])
PCA_EIGVEC = np.array(
  [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]]
)


def test_pca_lighting_adds_the_eigenvector_offset_of_its_seed():
  """Sec. 4.1: every pixel gets [p1 p2 p3][a1 l1, a2 l2, a3 l3]^T, a ~ N(0, 0.1), the
  same a for the whole image; on the 0-255 scale the eigenvalues are 255 l. Exact to
  1e-4 per pixel, so even the third component (~0.1 on this scale) is checked."""
  image = np.random.RandomState(3).uniform(0, 255, (5, 4, 3)).astype(np.float32)
  for i in range(20):
    seed = tf.constant([0, i])
    alpha = tf.random.stateless_normal([3], seed=seed, stddev=0.1).numpy()
    out = input_pipeline.pca_lighting(tf.constant(image), 0.1, seed).numpy()
    offset = PCA_EIGVEC @ (alpha * PCA_EIGVAL * 255)
    np.testing.assert_allclose(out - image, np.broadcast_to(offset, image.shape), atol=1e-4)


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
        write_jpeg(
          tmp_path / split / label / f'{i}.jpg', rng.randint(0, 256, (30, 40, 3), np.uint8)
        )
  write_jpeg(tmp_path / 'val' / 'cat' / 'gray.jpg', rng.randint(0, 256, (30, 40), np.uint8))
  write_jpeg(
    tmp_path / 'val' / 'dog' / 'cmyk.jpg', rng.randint(0, 256, (30, 40, 3), np.uint8), mode='CMYK'
  )
  for split in ('train', 'val'):
    (tmp_path / split / 'owl' / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff not a jpeg')
  return tmp_path


def folder_config(root, **overrides):
  config = imagenet.get_config()
  config.update(
    {
      'dataset': 'image_folder',
      'manual_dir': str(root),
      'test_split': 'val',
      'num_classes': 3,
      'image_size': 67,
      'resize_size': 75,
      'batch_size': 4,
      'eval_batch_size': 4,
      'shuffle_buffer': 12,
      **overrides,
    }
  )
  return config


def test_image_folder_skips_and_counts_a_corrupt_image(image_folder, caplog):
  data = input_pipeline.create_datasets(folder_config(image_folder))
  assert data.num_train_examples == 13 and data.num_test_examples == 12
  batches = list(data.test_batches())
  masks = np.concatenate([b['mask'] for b in batches])
  assert masks.sum() == 11  # 9 + grayscale + CMYK; the corrupt file is left out.
  assert all(b['image'].shape == (4, 67, 67, 3) and b['image'].dtype == np.float32 for b in batches)
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
  crops = [
    input_pipeline.inception_crop(encoded, 32, tf.constant([2, i])).numpy() for i in range(5)
  ]
  for out in crops:
    assert out.shape == (32, 32, 3)
    assert 0 <= out.min() and out.max() <= 255  # Bilinear: no overshoot.
  assert not np.allclose(crops[0], crops[1])
  np.testing.assert_array_equal(
    crops[0], input_pipeline.inception_crop(encoded, 32, tf.constant([2, 0])).numpy()
  )


def unaugmented_config():
  """Fashion-MNIST shrunk for 64 mock examples, without flips: a row shows its example."""
  config = fashion_mnist.get_config()
  config.update(batch_size=8, eval_batch_size=8, shuffle_buffer=16)
  config.augment.flip = False
  return config


def rows(batches):
  return [row.tobytes() for batch in batches for row in batch['image']]


def test_train_order_is_a_function_of_seed_and_step(fashion_mnist_as_is):
  """A resumed stream (mid-epoch, at an epoch start, in a later epoch) equals the rest of
  the uninterrupted one; each epoch uses every example once, in a new order."""
  del fashion_mnist_as_is
  with tfds.testing.mock_data(num_examples=64):
    data = input_pipeline.create_datasets(unaugmented_config())
    assert data.steps_per_epoch == 8
    stream = list(itertools.islice(data.train_batches(), 24))
    for start in (3, 8, 19):
      resumed = list(itertools.islice(data.train_batches(start_step=start), 24 - start))
      assert rows(resumed) == rows(stream[start:]), start
      for a, b in zip(resumed, stream[start:], strict=True):
        np.testing.assert_array_equal(a['label'], b['label'])
    epochs = [rows(stream[8 * e : 8 * (e + 1)]) for e in range(3)]
    for epoch in epochs:
      assert len(set(epoch)) == 64
    assert set(epochs[0]) == set(epochs[1]) and epochs[0] != epochs[1]
    # A resume builds its epoch's order directly: at epoch 10^6 (64 M examples in) it
    # reads only that epoch, which is again a new order of every example.
    far = rows(itertools.islice(data.train_batches(start_step=8 * 10**6), 8))
    assert len(set(far)) == 64 and far not in epochs


def test_parts_split_every_epoch_between_them(toy_image_folder):
  """Two parts (two groups of processes) feed 4 rows each per batch; together they use
  each example once per epoch, and each test example once, in as many batches."""
  config = folder_config(
    toy_image_folder,
    num_classes=10,
    batch_size=8,
    eval_batch_size=10,
    image_size=67,
    resize_size=67,
    shuffle_buffer=80,
  )
  config.augment.update(flip=False, pca_lighting_stddev=0.0)
  parts = [input_pipeline.create_datasets(config, part, 2) for part in (0, 1)]
  assert parts[0].steps_per_epoch == 10  # 80 examples over both parts.
  epoch = [list(itertools.islice(p.train_batches(), 10)) for p in parts]
  assert all(b['image'].shape[0] == 4 for p in epoch for b in p)
  assert len(set(rows(epoch[0]) + rows(epoch[1]))) == 80
  tests = [list(p.test_batches()) for p in parts]  # 19 + 18 examples, 5 rows a batch.
  assert parts[0].num_test_batches == len(tests[0]) == len(tests[1]) == 4
  real = [{'image': b['image'][b['mask'] > 0]} for p in tests for b in p]
  assert len(rows(real)) == len(set(rows(real))) == 37
