"""Tests of classifying image files with a checkpoint."""

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from flax import nnx

from alexnet_jax import config_lib
from alexnet_jax import input_pipeline
from alexnet_jax import predict
from alexnet_jax import steps
from configs import fashion_mnist
from helpers import run_module
from helpers import save_checkpoint

FASHION_MNIST_NAMES = [
  'T-shirt/top',
  'Trouser',
  'Pullover',
  'Dress',
  'Coat',
  'Sandal',
  'Shirt',
  'Sneaker',
  'Bag',
  'Ankle boot',
]


@pytest.fixture
def workdir(tmp_path, fashion_mnist_as_is):
  """A checkpoint of a freshly initialised model at step 1, under mock Fashion-MNIST."""
  del fashion_mnist_as_is
  config = fashion_mnist.get_config()
  config.init = 'paper'  # Small logits: many classes get visible probability.
  params = save_checkpoint(config, str(tmp_path), 1)
  with tfds.testing.mock_data(num_examples=4):
    yield config, str(tmp_path), nnx.merge(steps.graphdefs(config)[1], params)


def write_png(path, seed):
  image = np.random.RandomState(seed).randint(0, 256, (28, 28, 1), np.uint8)
  tf.io.write_file(str(path), tf.io.encode_png(image))
  return str(path)


def test_top5_are_the_model_softmax_sorted(workdir, tmp_path):
  config, run_dir, model = workdir
  paths = [write_png(tmp_path / f'{i}.png', i) for i in range(2)]
  results = predict.predict_files(config, run_dir, paths)
  for path, top in zip(paths, results, strict=True):
    pixels = input_pipeline.preprocess_eval(tf.io.read_file(path), config).numpy()
    image = (pixels - np.float32(config.pixel_mean)) / np.float32(config.pixel_std)
    expected = np.asarray(jax.nn.softmax(model(image[None]))[0])
    assert len(top) == 5
    assert [p for _, p in top] == sorted((p for _, p in top), reverse=True)
    for name, probability in top:
      assert probability == pytest.approx(expected[FASHION_MNIST_NAMES.index(name)], rel=1e-5)
    assert top[0][1] == pytest.approx(expected.max(), rel=1e-5)


def test_bad_files_say_which(workdir, tmp_path):
  config, run_dir, _ = workdir
  with pytest.raises(FileNotFoundError, match='missing.png'):
    predict.predict_files(config, run_dir, [str(tmp_path / 'missing.png')])
  (tmp_path / 'broken.jpg').write_bytes(b'not an image')
  with pytest.raises(ValueError, match='broken.jpg'):
    predict.predict_files(config, run_dir, [str(tmp_path / 'broken.jpg')])


def test_image_files_are_originals_for_a_run_trained_on_a_prepared_copy(tmp_path):
  """An image file is rescaled as the original images were, whatever `prepared` says."""
  config = fashion_mnist.get_config()
  path = write_png(tmp_path / 'shoe.png', 3)
  expected = predict.load_image(path, config)
  for prepared_format in ('jpeg', 'raw'):
    config.update(prepared=True, prepared_format=prepared_format)
    np.testing.assert_array_equal(predict.load_image(path, config), expected)


@pytest.fixture
def folder_run(tmp_path, toy_image_folder):
  """A run's workdir (config.json and an untrained checkpoint at step 1) on
  `toy_image_folder`, for the commands run as processes."""
  config = fashion_mnist.get_config()
  config.update(dataset='image_folder', manual_dir=toy_image_folder, test_split='val')
  workdir = str(tmp_path / 'run')
  save_checkpoint(config, workdir, 1)
  config_lib.save(config, workdir)
  return config, workdir


@pytest.mark.slow
def test_predict_and_plots_take_the_mesh_from_the_command_line(folder_run, tmp_path):
  """`--config.mesh.*` reaches the mesh (README: eval, predict and plots choose one from
  the devices present unless they ask for one): one that does not fit the devices is
  refused naming the key (the flag was refused as unknown before)."""
  _, workdir = folder_run
  path = write_png(tmp_path / 'shoe.png', 0)
  for module, args in (('predict', [path]), ('plots', [])):
    result = run_module(
      f'alexnet_jax.{module}',
      f'--workdir={workdir}',
      '--config.mesh.data=3',
      *args,
      XLA_FLAGS='--xla_force_host_platform_device_count=2',
    )
    assert result.returncode == 1
    assert (
      result.stderr.strip()
      .splitlines()[-1]
      .startswith('ConfigError: config.mesh.data=3 × config.mesh.model=2 must equal the 2 devices')
    ), result.stderr[-3000:]
