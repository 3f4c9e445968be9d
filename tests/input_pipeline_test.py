"""Tests of data preparation, augmentation and the order of batches."""

import io
import itertools
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from alexnet_jax import augment
from alexnet_jax import config_lib
from alexnet_jax import datasets
from alexnet_jax import input_pipeline
from configs import fashion_mnist
from configs import imagenet

DEBIAN_FASHION_MNIST = '/usr/share/datasets/fashion-mnist'


@pytest.mark.slow
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


@pytest.mark.slow
def test_train_preprocessing_is_deterministic_and_flips_half_the_time():
  """Fashion-MNIST's crop is the whole image (image_size = resize_size): every draw
  gives the test view, and a flip with probability 1/2."""
  config = fashion_mnist.get_config()
  image = np.random.RandomState(0).randint(0, 256, (28, 28, 1), np.uint8)
  encoded = encode_png(image)
  plain = input_pipeline.preprocess_eval(encoded, config).numpy()
  assert plain.shape == (67, 67, 3) and plain.dtype == np.uint8
  flips = 0
  for i in range(200):
    seed = tf.constant([0, i], tf.int64)
    out = {k: v.numpy() for k, v in input_pipeline.preprocess_train(encoded, seed, config).items()}
    again = input_pipeline.preprocess_train(encoded, seed, config)
    assert all(np.array_equal(out[k], again[k].numpy()) for k in out)
    np.testing.assert_array_equal(out['image'], plain)
    np.testing.assert_array_equal(out['lighting'], [0, 0, 0])  # No PCA lighting on grey.
    flips += int(out['flip'])
  assert 70 < flips < 130


def test_model_input_normalises_with_config_statistics():
  config = fashion_mnist.get_config()
  encoded = encode_png(np.full((28, 28, 1), 72, np.uint8))
  pixels = input_pipeline.preprocess_eval(encoded, config).numpy()
  out = augment.model_input({'image': pixels[None]}, (config.pixel_mean, config.pixel_std))
  np.testing.assert_allclose(out, (72 - 72.94) / 90.02, rtol=1e-5)


def test_pad_rescale_puts_the_whole_image_inside_a_black_frame():
  config = fashion_mnist.get_config()
  config.update(resize='pad', image_size=67, resize_size=79)
  image = tf.fill((28, 28, 3), 200.0)
  out = input_pipeline.rescale(image, config).numpy()
  expected = np.zeros((79, 79, 3), np.float32)
  expected[6:73, 6:73] = 200.0  # 67 px of image, 6 px of 0 on every side.
  np.testing.assert_allclose(out, expected, atol=1e-3)


def test_crop_window_is_tf_random_crops_window():
  """The window `tf.image.stateless_random_crop` takes for the same seed: decoding only
  it gives the crop of the decoded image."""
  image = tf.reshape(tf.range(10 * 12 * 3, dtype=tf.float32), (10, 12, 3))
  tops = set()
  for i in range(20):
    seed = tf.constant([1, i])
    top, left = input_pipeline.crop_window(tf.shape(image), 7, seed).numpy()
    expected = tf.image.stateless_random_crop(image, (7, 7, 3), seed=seed).numpy()
    np.testing.assert_array_equal(image.numpy()[top : top + 7, left : left + 7], expected)
    tops.add(top)
  assert tops == set(range(4))


# fb.resnet.torch datasets/imagenet.lua `pca`: eigenvalues and eigenvectors (columns) of
# the ImageNet RGB covariance on the [0, 1] scale; typed here, not read from the module.
PCA_EIGVAL = np.array([0.2175, 0.0188, 0.0045])
PCA_EIGVEC = np.array(
  [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]]
)


def test_pca_lighting_offset_is_the_eigenvector_offset_of_its_seed():
  """Sec. 4.1: every pixel gets [p1 p2 p3][a1 l1, a2 l2, a3 l3]^T, a ~ N(0, 0.1), the
  same a for the whole image; on the 0-255 scale the eigenvalues are 255 l. Exact to
  1e-4, so even the third component (~0.1 on this scale) is checked."""
  for i in range(20):
    seed = tf.constant([0, i])
    alpha = tf.random.stateless_normal([3], seed=seed, stddev=0.1).numpy()
    out = input_pipeline.lighting_offset(0.1, seed).numpy()
    np.testing.assert_allclose(out, PCA_EIGVEC @ (alpha * PCA_EIGVAL * 255), atol=1e-4)


def host_reference(encoded, seed, config):
  """What the host computed before the per-pixel work moved to the device, from TF's
  own ops: rescale in float32, tf.image's stateless crop and flip, the PCA offset,
  normalisation (Sec. 4.1, Sec. 2)."""
  crop_seed, flip_seed, light_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  image = input_pipeline.rescale(input_pipeline.decode(encoded), config)
  size = (config.image_size, config.image_size, 3)
  image = tf.image.stateless_random_crop(image, size, seed=crop_seed)
  image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
  alpha = tf.random.stateless_normal([3], seed=light_seed, stddev=0.1).numpy()
  image = image.numpy() + (PCA_EIGVEC @ (alpha * PCA_EIGVAL * 255)).astype(np.float32)
  return (image - np.asarray(config.pixel_mean, np.float32)) / np.asarray(config.pixel_std)


@pytest.mark.parametrize('resize', ['shorter_side', 'square'])
def test_device_augmentation_is_the_host_reference(resize):
  """Crop, flip and lighting drawn on the host, applied on the device (`augment`), give
  the host reference's images for the same seeds, within the rounding of the rescaled
  image to uint8 (0.5 of 255 before normalisation)."""
  config = imagenet.get_config()
  config.update(image_size=20, resize_size=24, resize=resize, pixel_std=(58.4, 57.1, 57.4))
  image = np.random.RandomState(4).randint(0, 256, (37, 29, 3), np.uint8)
  encoded = tf.io.encode_png(image)
  examples = [
    input_pipeline.preprocess_train(encoded, tf.constant([5, i], tf.int64), config)
    for i in range(16)
  ]
  batch = {k: np.stack([e[k].numpy() for e in examples]) for k in examples[0]}
  assert batch['image'].dtype == np.uint8 and 0 < batch['flip'].sum() < 16
  out = np.asarray(augment.model_input(batch, (config.pixel_mean, config.pixel_std)))
  for i in range(16):
    expected = host_reference(encoded, tf.constant([5, i], tf.int64), config)
    tolerance = 0.5 / np.asarray(config.pixel_std) + 1e-4
    assert np.all(np.abs(out[i] - expected) <= tolerance), i


def test_pad_batch_masks_padding():
  batch = {'image': np.ones((3, 2, 2, 3), np.float32), 'label': np.arange(3, dtype=np.int32)}
  padded = input_pipeline.pad_batch(batch, 5)
  assert padded['image'].shape == (5, 2, 2, 3)
  np.testing.assert_array_equal(padded['mask'], [1, 1, 1, 0, 0])
  np.testing.assert_array_equal(padded['label'], [0, 1, 2, 0, 0])
  whole = input_pipeline.pad_batch(batch, 3)  # Nothing to pad: the arrays themselves.
  assert whole['image'] is batch['image'] and whole['label'] is batch['label']
  np.testing.assert_array_equal(whole['mask'], [1, 1, 1])
  assert whole['mask'].dtype == np.float32 and 'mask' not in batch


def test_model_input_flips_and_lights_each_example_of_crop_batches():
  """[N, crops, H, W, 3] batches (10-crop evaluation with draws): example n's crops are
  all reflected along W where flip[n], and all get lighting[n]; numpy reference."""
  rng = np.random.RandomState(3)
  images = rng.randint(0, 256, (4, 2, 3, 5, 3)).astype(np.uint8)
  flip = np.array([True, False, True, False])
  lighting = rng.randn(4, 3).astype(np.float32) * 10
  mean, std = (10.0, 20.0, 30.0), (2.0, 4.0, 5.0)
  expected = np.where(flip[:, None, None, None, None], images[:, :, :, ::-1], images)
  expected = (expected + lighting[:, None, None, None, :] - np.array(mean)) / np.array(std)
  for batch in (
    {'image': images, 'flip': flip, 'lighting': lighting},
    {'image': images[:, 0], 'flip': flip, 'lighting': lighting},  # [N, H, W, 3] as well.
  ):
    out = np.asarray(augment.model_input(batch, (mean, std)))
    want = expected if batch['image'].ndim == 5 else expected[:, 0]
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-5)


def pil_decode(data: bytes) -> np.ndarray:
  """RGB uint8 pixels of image bytes as Pillow (libjpeg's accurate integer IDCT) decodes."""
  return np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))


def photo_like_jpeg(quality: int = 95) -> bytes:
  """A JPEG of smooth colour waves and noise (where the IDCT's accuracy shows)."""
  yy, xx = np.mgrid[0:48, 0:64]
  waves = [128 + 100 * np.sin(xx / 7 + c) * np.cos(yy / 5) for c in range(3)]
  noise = np.random.RandomState(0).rand(48, 64, 3) * 40
  pixels = np.clip(np.stack(waves, -1) + noise, 0, 255).astype(np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, 'JPEG', quality=quality)
  return out.getvalue()


def test_jpegs_decode_with_the_accurate_idct():
  """As libjpeg's accurate integer IDCT (Pillow) decodes them, not TF's fast default,
  for originals and for a prepared copy's JPEGs (whole, or its window)."""
  data = photo_like_jpeg()
  want = pil_decode(data)
  np.testing.assert_array_equal(input_pipeline.decode(tf.constant(data)).numpy(), want)
  config = imagenet.get_config()
  config.update(image_size=40, resize_size=48, prepared=True, prepared_format='jpeg')
  crops = input_pipeline.preprocess_eval(tf.constant(data), config, crops=10).numpy()
  np.testing.assert_array_equal(crops[0], want[:40, :40])  # Top-left: the whole decoded.
  config.augment.crop = 'paper'
  crop = input_pipeline.paper_crop(tf.constant(data), tf.constant([0, 1]), config).numpy()
  top, left = input_pipeline.crop_window((48, 48, 3), 40, tf.constant([0, 1])).numpy()
  np.testing.assert_array_equal(crop[:, :-1], want[top : top + 40, left : left + 39])


def test_a_prepared_jpegs_central_crop_decodes_only_that_window():
  """1 and 2 test crops of a prepared JPEG: one DecodeAndCropJpeg of the central window,
  no whole decode; its pixels are the whole decode's, but for the last column (chroma
  upsampled from a right neighbour the window lacks)."""
  data = photo_like_jpeg()
  config = imagenet.get_config()
  config.update(image_size=40, resize_size=48, prepared=True, prepared_format='jpeg')
  want = pil_decode(data)[4:44, 4:44]

  def view_of(crops):
    return tf.function(lambda encoded: input_pipeline.preprocess_eval(encoded, config, crops))

  for crops in (1, 2):
    view = view_of(crops)
    graph = view.get_concrete_function(tf.TensorSpec([], tf.string)).graph
    ops = [op.type for op in graph.get_operations()]
    assert 'DecodeAndCropJpeg' in ops and 'DecodeJpeg' not in ops, ops
    out = view(tf.constant(data)).numpy()
    central = out if crops == 1 else out[0]
    np.testing.assert_array_equal(central[:, :-1], want[:, :-1])
    assert np.abs(central[:, -1].astype(int) - want[:, -1]).mean() < 8
    if crops == 2:
      np.testing.assert_array_equal(out[1], central[:, ::-1])


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
  assert all(b['image'].shape == (4, 67, 67, 3) and b['image'].dtype == np.uint8 for b in batches)
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
  assert batch['image'].shape == (4, 67, 67, 3) and batch['image'].dtype == np.uint8
  assert set(batch) == {'image', 'label', 'flip', 'lighting'} and set(batch['label']) <= {0, 1, 2}
  assert batch['flip'].dtype == bool and batch['lighting'].shape == (4, 3)
  # A PCA-lighting offset of 0.1 (Sec. 4.1): ~ +-20 of 255.
  assert 0 < np.abs(batch['lighting']).max() < 100


def test_wrong_class_count_says_which(image_folder):
  with pytest.raises(ValueError, match='set --config.num_classes=3'):
    input_pipeline.create_datasets(folder_config(image_folder, num_classes=1000))


def resized_windows(image: np.ndarray, size: int) -> dict[tuple[int, int, int, int], np.ndarray]:
  """{(top, left, height, width): that window of `image` resized to `size`², bilinear,
  antialiased} for every window of `image` (float32 [H, W, 3])."""
  h, w = image.shape[:2]
  windows = {}
  for height, width in itertools.product(range(1, h + 1), range(1, w + 1)):
    corners = list(itertools.product(range(h - height + 1), range(w - width + 1)))
    stack = np.stack([image[t : t + height, x : x + width] for t, x in corners])
    resized = tf.image.resize(stack, (size, size), antialias=True).numpy()
    windows.update({(t, x, height, width): r for (t, x), r in zip(corners, resized, strict=True)})
  return windows


def pil_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Pillow's bilinear resize (its support widens when shrinking, as an antialiased
  one does), per channel in float32: an implementation other than TensorFlow's."""
  return np.stack(
    [
      np.asarray(Image.fromarray(image[..., c], 'F').resize((width, height), Image.BILINEAR))
      for c in range(image.shape[-1])
    ],
    axis=-1,
  )


def test_inception_crop_is_a_resized_window_of_the_image():
  """Each crop is exactly one window of the image, of 8-100% of its area and aspect
  3/4-4/3 (width rounded to whole pixels), resized with antialiasing (Pillow's bilinear
  resize of that window agrees); other seeds, other windows."""
  image = np.random.RandomState(1).randint(0, 256, (12, 16, 3), np.uint8)
  encoded = tf.io.encode_png(image)  # The non-JPEG path crops after decoding.
  windows = resized_windows(image.astype(np.float32), 8)
  found = []
  for i in range(12):
    out = input_pipeline.inception_crop(encoded, 8, tf.constant([2, i])).numpy()
    assert out.shape == (8, 8, 3)
    np.testing.assert_array_equal(
      out, input_pipeline.inception_crop(encoded, 8, tf.constant([2, i])).numpy()
    )
    [(top, left, height, width)] = [k for k, v in windows.items() if np.array_equal(v, out)]
    assert 0.08 * 12 * 16 <= height * width <= 12 * 16
    assert 3 / 4 * height - 0.5 <= width <= 4 / 3 * height + 0.5
    window = image[top : top + height, left : left + width].astype(np.float32)
    np.testing.assert_allclose(out, pil_resize(window, 8, 8), atol=2e-3)
    found.append((top, left, height, width))
  assert len(set(found)) > 6 and min(h * w for _, _, h, w in found) < 12 * 16 / 2, found


@pytest.mark.parametrize(
  'shape, resized',
  [
    ((45, 30), (36, 24)),  # Shrunk: antialiasing matters.
    ((15, 19), (24, 30)),  # Enlarged, 19 · 24 / 15 = 30.4 rounded.
  ],
)
def test_paper_crop_is_a_random_window_of_the_central_patch_of_the_rescaled_image(shape, resized):
  """Sec. 4.1's crop against Pillow: shorter side to 24 (bilinear, antialiased), the
  central 24², then 20² at one of its 5 × 5 offsets, each offset taken by some seed,
  rounded to uint8. (Pillow and TensorFlow agree to ~5e-4 of 255.)"""
  config = imagenet.get_config()
  config.update(image_size=20, resize_size=24)
  config.augment.update(flip=False, pca_lighting_stddev=0.0)
  image = np.random.RandomState(2).randint(0, 256, (*shape, 3), np.uint8)
  encoded = tf.io.encode_png(image)
  rescaled = pil_resize(image.astype(np.float32), *resized)
  top, left = (resized[0] - 24) // 2, (resized[1] - 24) // 2
  central = rescaled[top : top + 24, left : left + 24]
  offsets = []
  for i in range(40):
    seed = tf.constant([3, i], tf.int64)
    out = input_pipeline.preprocess_train(encoded, seed, config)['image'].numpy()
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    [offset] = [  # Rounded to uint8: within 0.5.
      (t, x)
      for t, x in itertools.product(range(5), range(5))
      if np.abs(out - central[t : t + 20, x : x + 20]).max() < 0.5 + 2e-3
    ]
    offsets.append(offset)
  assert {t for t, _ in offsets} == {x for _, x in offsets} == set(range(5)), offsets


def unaugmented_config():
  """Fashion-MNIST shrunk for 64 mock examples, without flips: a row shows its example."""
  config = fashion_mnist.get_config()
  config.update(batch_size=8, eval_batch_size=8, shuffle_buffer=16)
  config.augment.flip = False
  return config


def rows(batches):
  return [row.tobytes() for batch in batches for row in batch['image']]


@pytest.mark.slow
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


# --------------------------------------------------------------------------------------
# Subsets: config.classes and config.train_examples_per_class.


def raw_examples(builder, split):
  """(labels int [N], encoded images) of `split` in its stored order, read with TFDS."""
  ds = builder.as_dataset(
    split=split,
    decoders={'image': tfds.decode.SkipDecoding()},
    read_config=tfds.ReadConfig(interleave_cycle_length=1),
  )
  examples = list(tfds.as_numpy(ds))
  return np.array([e['label'] for e in examples]), [e['image'] for e in examples]


def first_per_class(labels, classes, n=None):
  """Positions of the first `n` (None: all) examples of each of `classes`, in order."""
  kept, seen = [], {c: 0 for c in classes}
  for i, label in enumerate(labels):
    if label in seen and (n is None or seen[label] < n):
      kept.append(i)
      seen[label] += 1
  return kept


def expected_rows(config, images, labels, classes, positions):
  """{row bytes: new label} of the examples at `positions`, as unaugmented batches
  show them (the eval preprocessing, where the train one only flips and crops)."""
  return {
    input_pipeline.preprocess_eval(tf.constant(images[i]), config).numpy().tobytes(): (
      classes.index(labels[i])
    )
    for i in positions
  }


def labelled_rows(batches):
  return [
    (row.tobytes(), int(label))
    for batch in batches
    for row, label in zip(batch['image'], batch['label'], strict=True)
  ]


def test_classes_filter_and_relabel_both_splits(fashion_mnist_as_is):
  del fashion_mnist_as_is
  classes = (7, 2, 5)
  config = unaugmented_config()
  config.update(classes=classes, num_classes=3)
  with tfds.testing.mock_data(num_examples=64):
    builder = tfds.builder('fashion_mnist')
    data = input_pipeline.create_datasets(config)
    for split in ('train', 'test'):
      labels, images = raw_examples(builder, split)
      kept = [i for i, label in enumerate(labels) if label in classes]
      expected = expected_rows(config, images, labels, list(classes), kept)
      assert len(expected) == len(kept) > 8
      if split == 'test':
        assert data.num_test_examples == len(kept)
        batches = list(data.test_batches())
        assert len(batches) == data.num_test_batches == -(-len(kept) // 8)
        real = [{k: b[k][b['mask'] > 0] for k in ('image', 'label')} for b in batches]
        # In order: the test split's kept examples, relabelled.
        assert labelled_rows(real) == list(expected.items())
      else:
        assert data.num_train_examples == len(kept)
        assert data.steps_per_epoch == len(kept) // 8
        epoch = labelled_rows(itertools.islice(data.train_batches(), data.steps_per_epoch))
        assert len({row for row, _ in epoch}) == len(epoch) == data.steps_per_epoch * 8
        assert all(expected.get(row) == label for row, label in epoch)
  assert datasets.class_names(config) == ['Sneaker', 'Pullover', 'Sandal']


@pytest.mark.slow
@pytest.mark.parametrize('classes', [(0, 3, 2), ()])
def test_train_examples_per_class_keeps_the_first_n_of_each(fashion_mnist_as_is, classes):
  """One epoch (batches of 1) is exactly the first 2 train examples of each class;
  the test split keeps all of them, and the train split read as a test split only those."""
  del fashion_mnist_as_is
  config = unaugmented_config()
  config.update(classes=classes, num_classes=len(classes) or 10, train_examples_per_class=2)
  config.update(batch_size=1)
  with tfds.testing.mock_data(num_examples=64):
    builder = tfds.builder('fashion_mnist')
    data = input_pipeline.create_datasets(config)
    labels, images = raw_examples(builder, 'train')
    ids = list(classes or range(10))
    kept = first_per_class(labels, ids, 2)
    assert len(kept) == 2 * len(ids)  # Each class has at least 2 (else: fix the test).
    assert data.num_train_examples == data.steps_per_epoch == len(kept)
    expected = expected_rows(config, images, labels, ids, kept)
    epoch = labelled_rows(itertools.islice(data.train_batches(), len(kept)))
    assert sorted(epoch) == sorted(expected.items())
    test_labels, _ = raw_examples(builder, 'test')
    assert data.num_test_examples == sum(label in ids for label in test_labels)
    # The train split read as a test split (features --probe): the same examples, in order.
    config.test_split = 'train'
    data = input_pipeline.create_datasets(config)
    assert data.num_test_examples == len(kept)
    batches = list(data.test_batches())
    real = [{k: b[k][b['mask'] > 0] for k in ('image', 'label')} for b in batches]
    assert labelled_rows(real) == list(expected.items())


class SubsetDigits(tfds.core.GeneratorBasedBuilder):
  """`subset_digits`: train 60 (6 per class), test 25 random 28×28 grey images of 10
  classes, in shuffled class order; a TFDS dataset on disk, read in even splits."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(shape=(28, 28, 1)),
          'label': tfds.features.ClassLabel(num_classes=10),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(60, 0), 'test': self._generate_examples(25, 1)}

  def _generate_examples(self, count, seed):
    rng = np.random.RandomState(seed)
    for i, label in enumerate(rng.permutation(np.arange(count) % 10)):
      yield i, {'image': rng.randint(0, 256, (28, 28, 1), np.uint8), 'label': label}


@pytest.mark.slow
@pytest.mark.parametrize('source', ['image_folder', 'tfds'])
def test_parts_keep_the_first_n_of_each_class_of_the_whole_split(
  source, toy_image_folder, tmp_path
):
  """Two parts (image folders: interleaved; TFDS: its two halves) keep between them
  the split's first 3 of each class, each part the ones it holds, and run the same
  numbers of train steps (what the smaller part fills) and test batches (what the
  larger one needs)."""
  classes = [9, 0, 4]
  if source == 'image_folder':
    config = folder_config(toy_image_folder, image_size=67, resize_size=67)
    builder = tfds.ImageFolder(toy_image_folder)
    test_split = 'val'
  else:
    config = unaugmented_config()
    config.update(dataset='subset_digits', data_dir=str(tmp_path), manual_dir=None)
    builder = tfds.builder('subset_digits', data_dir=str(tmp_path))
    builder.download_and_prepare()
    test_split = 'test'
  config.update(classes=tuple(classes), num_classes=3, train_examples_per_class=3)
  config.update(batch_size=2, eval_batch_size=4)
  config.augment.update(flip=False, pca_lighting_stddev=0.0)
  parts = [input_pipeline.create_datasets(config, part, 2) for part in (0, 1)]

  def part_of(split):
    """The part (0, 1) of each example of `split`, by position."""
    n = len(raw_examples(builder, split)[0])
    if source == 'image_folder':
      return [i % 2 for i in range(n)]
    half = len(list(builder.as_dataset(split=tfds.even_splits(split, 2)[0])))
    return [int(i >= half) for i in range(n)]

  labels, images = raw_examples(builder, 'train')
  kept = first_per_class(labels, classes, 3)
  owner = part_of('train')
  kept_by_part = [[i for i in kept if owner[i] == part] for part in (0, 1)]
  assert len(kept) == 9
  steps = min(map(len, kept_by_part))  # Each part feeds 1 row of each batch.
  for part, data in enumerate(parts):
    assert data.num_train_examples == 9
    assert data.steps_per_epoch == steps
    expected = expected_rows(config, images, labels, classes, kept_by_part[part])
    stream = labelled_rows(itertools.islice(data.train_batches(), 3 * steps))
    for e in range(3):
      epoch = stream[e * steps : (e + 1) * steps]
      assert len(set(epoch)) == steps and all(expected.get(row) == lab for row, lab in epoch)
    if len(kept_by_part[part]) == steps:  # The smaller part: all of it every epoch.
      assert sorted(stream[:steps]) == sorted(expected.items())

  test_labels, _ = raw_examples(builder, test_split)
  test_owner = part_of(test_split)
  expected_test = [
    [classes.index(c) for i, c in enumerate(test_labels) if c in classes and test_owner[i] == part]
    for part in (0, 1)
  ]
  num_batches = -(-max(map(len, expected_test)) // 2)  # 2 rows of each batch per part.
  for part, data in enumerate(parts):
    assert data.num_test_examples == sum(map(len, expected_test))
    batches = list(data.test_batches())
    assert len(batches) == data.num_test_batches == num_batches
    masked = [int(c) for b in batches for c in b['label'][b['mask'] > 0]]
    assert masked == expected_test[part]


def test_unknown_class_id_is_refused_before_images_are_read(fashion_mnist_as_is, monkeypatch):
  del fashion_mnist_as_is

  def no_reading(*args, **kwargs):
    raise AssertionError('The data were read.')

  config = unaugmented_config()
  config.update(classes=(3, 10), num_classes=2)
  with tfds.testing.mock_data(num_examples=64):
    monkeypatch.setattr(tfds.core.DatasetBuilder, 'as_dataset', no_reading)
    with pytest.raises(
      config_lib.ConfigError, match=r'config\.classes=\(3, 10\) holds id 10.* has 10 classes'
    ):
      input_pipeline.create_datasets(config)


@pytest.mark.slow
@pytest.mark.parametrize('classes, per_class', [((0, 3, 2, 8), 4), ((1, 5, 6), None)])
def test_subset_train_order_is_a_function_of_seed_and_step(fashion_mnist_as_is, classes, per_class):
  """With a subset, a resumed stream (mid-epoch, at an epoch start, in a later epoch)
  equals the rest of the uninterrupted one; every epoch reshuffles the same examples."""
  del fashion_mnist_as_is
  config = unaugmented_config()
  config.update(classes=classes, num_classes=len(classes), train_examples_per_class=per_class)
  config.update(batch_size=4)
  with tfds.testing.mock_data(num_examples=64):
    data = input_pipeline.create_datasets(config)
    steps = data.steps_per_epoch
    assert steps >= 4
    stream = list(itertools.islice(data.train_batches(), 3 * steps))
    for start in (1, steps, 2 * steps + 1):
      resumed = list(itertools.islice(data.train_batches(start_step=start), 3 * steps - start))
      assert labelled_rows(resumed) == labelled_rows(stream[start:]), start
    epochs = [labelled_rows(stream[steps * e : steps * (e + 1)]) for e in range(3)]
    if per_class is not None:  # 16 examples, 4 batches of 4: each epoch all of them.
      assert steps == 4 and set(epochs[0]) == set(epochs[1]) == set(epochs[2])
    assert epochs[0] != epochs[1] != epochs[2]


@pytest.mark.parametrize('prepared_format', ['jpeg', 'raw'])
def test_prepared_crops_are_crops_of_the_stored_image(prepared_format):
  """From a prepared copy (the `stored_image`, as JPEG or raw pixels) a train crop is
  the same window of the stored image as the original path takes (a JPEG's decoded
  only inside it), and the test view is its central patch; the original path's
  crops are windows of its own `stored_image`."""
  config = imagenet.get_config()
  config.update(image_size=20, resize_size=24)
  original = tf.io.encode_png(np.random.RandomState(6).randint(0, 256, (37, 29, 3), np.uint8))
  stored = input_pipeline.stored_image(original, config)
  assert stored.shape == (24, 24, 3) and stored.dtype == tf.uint8
  if prepared_format == 'jpeg':
    encoded = tf.io.encode_jpeg(stored, quality=95)
    pixels = pil_decode(encoded.numpy())
  else:
    encoded, pixels = stored, stored.numpy()
  prepared = config.copy_and_resolve_references()
  prepared.update(prepared=True, prepared_format=prepared_format)
  for i in range(12):
    seed = tf.constant([7, i], tf.int64)
    crop_seed = tf.random.experimental.stateless_split(seed, 3)[0]
    from_copy = input_pipeline.preprocess_train(encoded, seed, prepared)
    from_original = input_pipeline.preprocess_train(original, seed, config)
    window = tf.image.stateless_random_crop(pixels, (20, 20, 3), seed=crop_seed).numpy()
    crop = from_copy['image'].numpy()
    # libjpeg upsamples 4:2:0 chroma from the right neighbour, which a window decode
    # lacks at its last column.
    np.testing.assert_array_equal(crop[:, :-1], window[:, :-1])
    assert np.abs(crop[:, -1].astype(int) - window[:, -1]).mean() < 8
    expected = tf.image.stateless_random_crop(stored, (20, 20, 3), seed=crop_seed).numpy()
    np.testing.assert_array_equal(from_original['image'].numpy(), expected)
    for key in ('flip', 'lighting'):
      np.testing.assert_array_equal(from_copy[key].numpy(), from_original[key].numpy())
  central = input_pipeline.preprocess_eval(encoded, prepared).numpy()
  np.testing.assert_array_equal(central[:, :-1], pixels[2:22, 2:21])
  assert np.abs(central[:, -1].astype(int) - pixels[2:22, 21]).mean() < 8


def test_a_train_split_where_no_image_decodes_stops_with_a_clear_error(tmp_path):
  """An image folder of text files named .jpg: an error naming the split, not an
  endless stream that never yields a batch."""
  for split in ('train', 'val'):
    for label in ('cat', 'dog'):
      os.makedirs(tmp_path / split / label)
      for i in range(3):
        (tmp_path / split / label / f'{i}.jpg').write_text('not an image\n')
  data = input_pipeline.create_datasets(folder_config(tmp_path, num_classes=2, batch_size=2))
  with pytest.raises(ValueError, match='None of the first 1000 images of image_folder train'):
    next(data.train_batches())


def test_decode_threads_are_the_cores_this_process_may_use(monkeypatch):
  """Not min(16, cores): every core of the affinity mask (here 3 of a 64-core host)."""
  monkeypatch.setattr(input_pipeline, 'cgroup_cpu_limit', lambda: None)  # hosts_test's.
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 2, 5})
  monkeypatch.setattr(os, 'cpu_count', lambda: 64)
  assert input_pipeline.decode_threads() == 3
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(64)))
  assert input_pipeline.decode_threads() == 64


class SortedDigits(tfds.core.GeneratorBasedBuilder):
  """`sorted_digits`: train 80 examples, 8 per class of 10, stored class by class (TFDS
  not shuffling them: as ImageNet's tars hold them), 8×8 grey images."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(shape=(8, 8, 1)),
          'label': tfds.features.ClassLabel(num_classes=10),
        }
      ),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(80), 'test': self._generate_examples(10)}

  def _generate_examples(self, count):
    image = np.zeros((8, 8, 1), np.uint8)
    for i in range(count):
      yield i, {'image': image, 'label': i * 10 // count}


@pytest.mark.slow
def test_train_files_are_read_in_a_new_order_every_epoch_one_example_at_a_time(tmp_path):
  """A split stored class by class in 10 files, read without a shuffle buffer: each
  epoch takes one example from every file in turn (TFDS's 16 files at once, block
  length 1; its default took 16 from one file), the files in a new order every epoch,
  and a resumed stream is the rest of the uninterrupted one."""
  builder = tfds.builder('sorted_digits', data_dir=str(tmp_path))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=10))
  files = [
    {int(e['label']) for e in tfds.as_numpy(builder.as_dataset(split=f'train[{i}:{i + 8}]'))}
    for i in range(0, 80, 8)
  ]
  assert builder.info.splits['train'].num_shards == 10 and files == [{c} for c in range(10)]
  config = unaugmented_config()
  config.update(dataset='sorted_digits', data_dir=str(tmp_path), manual_dir=None, cache=False)
  config.update(batch_size=10, shuffle_buffer=1)
  data = input_pipeline.create_datasets(config)
  assert data.steps_per_epoch == 8
  stream = [b['label'].tolist() for b in itertools.islice(data.train_batches(), 24)]
  firsts = [stream[8 * epoch] for epoch in range(3)]
  assert all(sorted(first) == list(range(10)) for first in firsts), firsts
  assert firsts[0] != firsts[1] != firsts[2] != firsts[0]
  for start in (3, 8, 13):
    resumed = [b['label'].tolist() for b in itertools.islice(data.train_batches(start), 24 - start)]
    assert resumed == stream[start:], start
