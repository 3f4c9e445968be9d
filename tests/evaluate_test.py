"""Tests of checkpoint evaluation: the 10-crop test (Sec. 4.1), counts, meshes, errors."""

import json
import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from alexnet_jax import config_lib
from alexnet_jax import evaluate
from alexnet_jax import input_pipeline
from alexnet_jax import plots
from alexnet_jax import predict
from alexnet_jax import sharding
from alexnet_jax import steps
from alexnet_jax import train
from helpers import on_devices
from helpers import save_checkpoint
from helpers import small_config as base_config
from helpers import train_state


pytestmark = pytest.mark.usefixtures('fashion_mnist_as_is')


def small_config(**overrides):
  return base_config(num_train_steps=2, checkpoint_every_steps=2, **overrides)


def save_untrained_checkpoint(config, workdir, step):
  _, eval_graphdef = steps.graphdefs(config)
  return eval_graphdef, save_checkpoint(config, workdir, step)


def test_ten_crops_are_the_corners_centre_and_their_reflections():
  h, w, size = 9, 11, 4
  image = np.arange(h * w * 3, dtype=np.float32).reshape(h, w, 3)
  crops = input_pipeline.ten_crops(tf.constant(image), size).numpy()
  top, left = (h - size) // 2, (w - size) // 2
  patches = [
    image[:size, :size],
    image[:size, w - size :],
    image[h - size :, :size],
    image[h - size :, w - size :],
    image[top : top + size, left : left + size],
  ]
  expected = np.stack(patches + [p[:, ::-1] for p in patches])
  assert crops.shape == (10, size, size, 3)
  np.testing.assert_array_equal(crops, expected)


@pytest.mark.slow
def test_ten_crop_eval_averages_the_softmax_of_each_crop():
  """Sums from the sharded 10-crop eval step = per-crop model calls, averaged by hand."""
  config = small_config(resize_size=75)  # Corner patches differ from the centre.
  rng = np.random.RandomState(0)
  images = rng.randn(2, 75, 75, 3).astype(np.float32)  # Normalised pixels.
  labels = np.array([3, 7], np.int32)
  crops = np.stack([input_pipeline.ten_crops(tf.constant(x), 67).numpy() for x in images])

  mesh = sharding.create_mesh(config.mesh, devices=jax.devices()[:2])  # Towers split.
  state, _ = train_state(config, mesh, seed=1)
  _, eval_graphdef = steps.graphdefs(config)
  eval_fn = steps.jit_eval_step(mesh, eval_graphdef, state.params)
  batch = {'image': crops, 'label': labels, 'mask': np.ones(2, np.float32)}
  sums = jax.device_get(eval_fn(state.params, sharding.global_batch(mesh, batch)))

  params = jax.device_get(state.params)
  model = jax.jit(lambda x: nnx.merge(eval_graphdef, params)(x))  # One crop at a time.
  h, w = 75, 75
  probs = []
  for image in images:
    patches = [
      image[:67, :67],
      image[:67, w - 67 :],
      image[h - 67 :, :67],
      image[h - 67 :, w - 67 :],
      image[4:71, 4:71],
    ]
    patches += [p[:, ::-1] for p in patches]
    probs.append(np.mean([jax.nn.softmax(model(jnp.asarray(p[None])))[0] for p in patches], axis=0))
  probs = np.stack(probs)
  assert not np.allclose(probs[0], jax.nn.softmax(model(jnp.asarray(crops[0, 4:5])))[0])
  assert float(sums['loss']) == pytest.approx(-np.log(probs[np.arange(2), labels]).sum(), rel=1e-4)
  assert float(sums['top1']) == np.sum(probs.argmax(-1) == labels)
  top5 = np.argsort(-probs, axis=-1)[:, :5]
  assert float(sums['top5']) == np.sum(np.any(top5 == labels[:, None], axis=-1))
  assert float(sums['count']) == 2


@pytest.mark.parametrize('crops', [2, 10])
@pytest.mark.slow
def test_every_test_example_counts_once(tmp_path, crops):
  """37 mock test examples in batches of 8 (the last padded) on the (2, 2) mesh."""
  config = small_config(eval_crops=crops)
  eval_graphdef, params = save_untrained_checkpoint(config, str(tmp_path), 4)
  with tfds.testing.mock_data(num_examples=37):
    results = evaluate.evaluate_checkpoint(config, str(tmp_path))
    test = tfds.as_numpy(tfds.builder('fashion_mnist').as_dataset(split='test'))
    images = np.stack(
      [
        input_pipeline.preprocess_eval(tf.io.encode_png(ex['image']), config, crops).numpy()
        for ex in test
      ]
    )
    labels = np.array([ex['label'] for ex in test])

  assert results['n_examples'] == len(labels) == 37
  assert results['step'] == 4 and results['crops'] == crops
  # Reference: the plain model on all 37 examples at once.
  model = nnx.merge(eval_graphdef, params)
  mean, std = (np.asarray(v, np.float32) for v in (config.pixel_mean, config.pixel_std))
  flat = jnp.asarray((images.reshape(-1, 67, 67, 3) - mean) / std)
  probs = np.asarray(jax.nn.softmax(model(flat))).reshape(37, crops, -1).mean(1)
  assert results['loss'] == pytest.approx(-np.log(probs[np.arange(37), labels]).mean(), rel=1e-4)
  assert results['top1'] == pytest.approx(np.mean(probs.argmax(-1) == labels))
  with open(tmp_path / 'eval_4.json') as f:
    assert json.load(f) == results


@pytest.mark.slow
def test_eval_predict_and_plots_on_one_device_of_a_run_trained_with_split_towers(
  tmp_path, monkeypatch
):
  """Train on two devices, evaluate on a laptop: the run's config.json says
  mesh.model=2, and neither eval nor predict nor plots needs an override."""
  config = small_config(eval_batch_size=12)  # 64 test examples: the last batch padded.
  config.mesh.model = 2
  with tfds.testing.mock_data(num_examples=64):
    on_devices(monkeypatch, 2)
    trained = train.train_and_evaluate(config, str(tmp_path))
    on_devices(monkeypatch, 1)
    saved = config_lib.for_workdir(str(tmp_path), None, {})
    results = evaluate.evaluate_checkpoint(saved, str(tmp_path))
    assert len(plots.write_all(saved, str(tmp_path))) == 4
    image = tmp_path / 'shoe.png'
    tf.io.write_file(str(image), tf.io.encode_png(np.zeros((28, 28, 1), np.uint8)))
    [top5] = predict.predict_files(saved, str(tmp_path), [str(image)])
  assert len(top5) == 5
  assert config_lib.load(str(tmp_path)).mesh.model == 2  # The run's record is kept.
  # Asked for, the run's mesh is still refused on one device, naming the keys.
  with pytest.raises(config_lib.ConfigError, match=r'mesh.model=2 must equal the 1 devices'):
    sharding.create_mesh(config_lib.for_workdir(str(tmp_path), None, {'mesh.model': 2}).mesh)

  with open(tmp_path / 'eval_2.json') as f:
    assert json.load(f) == results
  assert results['step'] == trained['step'] == 2
  assert results['n_examples'] == trained['n_test_examples'] == 64
  assert results['crops'] == 1
  assert results['top1'] == pytest.approx(trained['test_top1'], abs=1e-6)
  assert results['top5'] == pytest.approx(trained['test_top5'], abs=1e-6)
  assert results['loss'] == pytest.approx(trained['test_loss'], rel=1e-5)


@pytest.mark.slow
def test_missing_checkpoint_says_what_to_do(tmp_path):
  config = small_config()
  with pytest.raises(FileNotFoundError, match='train first'):
    evaluate.evaluate_checkpoint(config, str(tmp_path / 'missing'))
  assert not os.path.exists(tmp_path / 'missing')
  save_untrained_checkpoint(config, str(tmp_path), 3)
  with pytest.raises(FileNotFoundError, match=r'step 5 .* steps are \[3\]'):
    evaluate.evaluate_checkpoint(config, str(tmp_path), step=5)


def test_another_class_list_than_the_runs_is_refused_naming_the_key(tmp_path):
  """A run on classes (0, 1, 2, 3, 4) has output k = class k of that list: evaluating,
  predicting or plotting it with (5, 6, 7, 8, 9) would score and name other classes."""
  config_lib.save(small_config(classes=(0, 1, 2, 3, 4), num_classes=5), str(tmp_path))
  other = small_config(classes=(5, 6, 7, 8, 9), num_classes=5)
  message = r'trained with config.classes=\(0, 1, 2, 3, 4\) .* not \(5, 6, 7, 8, 9\)'
  for read in (
    lambda: evaluate.evaluate_checkpoint(other, str(tmp_path)),
    lambda: predict.predict_files(other, str(tmp_path), ['unused.png']),
    lambda: plots.write_all(other, str(tmp_path)),
  ):
    with pytest.raises(config_lib.ConfigError, match=message):
      read()
