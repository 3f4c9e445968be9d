"""Tests of AlexNet-BN (`config.model='alexnet_bn'`): BN against a numpy formula, the
global batch's statistics on the mesh, running averages in eval mode and checkpoints."""

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from alexnet_jax import checkpoints
from alexnet_jax import config_lib
from alexnet_jax import models
from alexnet_jax import optimizers
from alexnet_jax import sharding
from alexnet_jax import steps
from helpers import mesh_of
from helpers import small_config
from helpers import train_state

MOMENTUM, EPS = 0.9, 1e-4  # NVIDIA/caffe models/alexnet_bn/train_val2.prototxt.


def bn_numpy(x, mean=None, var=None):
  """(x - mean) / sqrt(var + eps) per channel (last axis), float64; the batch's own
  mean and biased variance over every other axis when not given."""
  x = np.asarray(x, np.float64)
  axes = tuple(range(x.ndim - 1))
  mean = x.mean(axes) if mean is None else np.asarray(mean, np.float64)
  var = ((x - x.mean(axes)) ** 2).mean(axes) if var is None else np.asarray(var, np.float64)
  return (x - mean) / np.sqrt(var + EPS)


def batch(n=8, size=67, seed=0):
  rng = np.random.RandomState(seed)
  return {
    'image': rng.randn(n, size, size, 3).astype(np.float32),
    'label': rng.randint(0, 10, n).astype(np.int32),
  }


def test_tower_batch_norm_equals_the_formula_in_train_and_eval_mode():
  rng = np.random.RandomState(0)
  towers = [rng.randn(4, 3, 3, 8).astype(np.float32) * 3 + 2, rng.randn(4, 3, 3, 8) * 0.5]
  bn = models.TowerBatchNorm(16)
  old_mean, old_var = rng.randn(16).astype(np.float32), rng.rand(16).astype(np.float32) + 0.5
  bn.mean[...], bn.var[...] = jnp.asarray(old_mean), jnp.asarray(old_var)
  whole = np.concatenate(towers, -1)
  ours = np.concatenate(bn([jnp.asarray(x, jnp.float32) for x in towers]), -1)
  np.testing.assert_allclose(ours, bn_numpy(whole), rtol=1e-5, atol=1e-5)
  batch_var = whole.reshape(-1, 16).var(0)
  np.testing.assert_allclose(
    bn.mean[...], MOMENTUM * old_mean + (1 - MOMENTUM) * whole.reshape(-1, 16).mean(0), rtol=1e-5
  )
  np.testing.assert_allclose(
    bn.var[...], MOMENTUM * old_var + (1 - MOMENTUM) * batch_var, rtol=1e-5
  )
  bn.use_running_average = True
  mean, var = np.asarray(bn.mean[...]), np.asarray(bn.var[...])
  evaluated = np.concatenate(bn([jnp.asarray(x, jnp.float32) for x in towers]), -1)
  np.testing.assert_allclose(evaluated, bn_numpy(whole, mean, var), rtol=1e-5, atol=1e-5)
  assert not np.allclose(evaluated, ours, atol=1e-2)  # Not the batch's statistics.
  np.testing.assert_array_equal(bn.mean[...], mean)  # Eval mode moves nothing.


def features_reference(model, images, stats=None):
  """pool5 of AlexNet-BN built from its own convolutions, with numpy BN where
  train_val2.prototxt has it: on the inputs of conv2 (pool1), conv3 (pool2), conv4 and
  conv5 (after conv3's and conv4's ReLU). `stats`: {name: (mean, var)} for eval mode."""

  def bn(name, x):
    mean, var = (None, None) if stats is None else stats[name]
    return jnp.asarray(bn_numpy(x, mean, var), jnp.float32)

  def split(x):
    return jnp.split(x, 2, axis=-1)

  def conv(layer, x):
    return jnp.concatenate(layer(x), -1)

  x = models.max_pool(jax.nn.relu(conv(model.conv1, images)))
  x = models.max_pool(jax.nn.relu(conv(model.conv2, split(bn('bn2', x)))))
  x = jax.nn.relu(conv(model.conv3, bn('bn3', x)))
  x = jax.nn.relu(conv(model.conv4, split(bn('bn4', x))))
  return models.max_pool(jax.nn.relu(conv(model.conv5, split(bn('bn5', x)))))


@pytest.mark.slow
def test_alexnet_bn_normalises_the_inputs_of_conv2_to_conv5_and_has_no_lrn():
  model = models.AlexNetBN(10, image_size=67, init='he', rngs=nnx.Rngs(params=0))
  images = jnp.asarray(batch()['image'])
  np.testing.assert_allclose(
    model.features(images), features_reference(model, images), rtol=1e-4, atol=1e-4
  )
  rng = np.random.RandomState(1)
  stats = {}
  for name in ('bn2', 'bn3', 'bn4', 'bn5'):
    bn = getattr(model, name)
    channels = bn.mean.shape[0]
    stats[name] = (rng.randn(channels) * 0.1, rng.rand(channels) + 0.5)
    bn.mean[...], bn.var[...] = (jnp.asarray(s, jnp.float32) for s in stats[name])
  model.eval()
  np.testing.assert_allclose(
    model.features(images), features_reference(model, images, stats), rtol=1e-4, atol=1e-4
  )


def test_parameter_count_at_227_px_and_1000_classes_is_alexnets():
  """BN in train_val2.prototxt learns nothing (scale_bias: false): AlexNet's parameters
  and 2 × (96 + 256 + 384 + 384) running averages."""
  config = small_config(model='alexnet_bn', image_size=227, resize_size=256, num_classes=1000)
  params, stats = jax.eval_shape(lambda: steps.init_variables(config, jax.random.key(0)))
  conv = [(11, 3, 96), (5, 48, 256), (3, 256, 384), (3, 192, 384), (3, 192, 256)]
  dense = [(6 * 6 * 256, 4096), (4096, 4096), (4096, 1000)]
  by_hand = sum(k * k * i * o + o for k, i, o in conv) + sum(i * o + o for i, o in dense)
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
  assert count(params) == by_hand == 60_965_224
  assert count(stats) == 2 * (96 + 256 + 384 + 384)
  assert sorted(params) == list(models.LAYERS)


@pytest.mark.slow
def test_a_step_on_a_2x2_mesh_equals_one_device_and_bn_moves_once_per_micro_batch():
  """With 2 micro-batches, the step on a 2 × 2 mesh equals one device's, parameters and
  running averages: each BN normalises by its micro-batch's statistics over all
  devices, not each device's share. bn2 (pool1's statistics, which no update changes
  within a step) moves as Caffe's iter_size: once per micro-batch, by its statistics."""
  config = small_config(model='alexnet_bn', dropout_rate=0.0, init='he')
  images = batch()['image']
  results = []
  for shape in ((1, 1), (2, 2)):
    mesh = mesh_of(*shape)
    state, tx = train_state(config, mesh)
    step = steps.jit_train_step(mesh, steps.graphdefs(config)[0], state, tx, grad_accum_steps=2)
    state, metrics = step(state, sharding.global_batch(mesh, batch()), jax.random.key(1))
    assert float(metrics['finite']) == 1.0
    results.append(jax.device_get((state.params, state.batch_stats, metrics['loss'])))
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), results[0], results[1]
  )
  model = steps.create_model(config, nnx.Rngs(params=jax.random.key(0)))  # train_state's.
  pool1 = np.asarray(
    models.max_pool(jax.nn.relu(jnp.concatenate(model.conv1(jnp.asarray(images)), -1)))
  )
  mean, var = 0.0, 1.0
  for rows in (pool1[0::2], pool1[1::2]):  # `steps.micro_batches`: rows i, i + k, ...
    flat = rows.reshape(-1, 96).astype(np.float64)
    mean = MOMENTUM * mean + (1 - MOMENTUM) * flat.mean(0)
    var = MOMENTUM * var + (1 - MOMENTUM) * flat.var(0)
  stats = results[0][1]
  np.testing.assert_allclose(stats['bn2']['mean'], mean, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats['bn2']['var'], var, rtol=1e-4, atol=1e-6)


def test_lars_has_no_bn_parameter_to_adapt_and_leaves_the_running_averages_alone():
  """AlexNet-BN's BN learns no scale or shift, so LARS's exclusions (biases, BN) have
  only biases to skip; the running averages are outside the optimizer altogether."""
  config = small_config(model='alexnet_bn', optimizer='lars')
  tx = optimizers.create_optimizer(config, optax.constant_schedule(0.1))
  state = jax.eval_shape(
    lambda: steps.create_train_state(config, tx, jax.random.key(0), mesh_of(1, 1))
  )
  paths = [
    jax.tree_util.keystr(p, simple=True, separator='/')
    for p, _ in jax.tree_util.tree_flatten_with_path((state.params, state.opt_state))[0]
  ]
  assert paths and not [p for p in paths if re.search('bn|mean|var', p)]
  assert sorted(state.batch_stats) == ['bn2', 'bn3', 'bn4', 'bn5']


@pytest.mark.slow
def test_checkpoints_keep_the_running_averages_for_restore_params_and_init_from(tmp_path):
  config = small_config(model='alexnet_bn')
  mesh = mesh_of(1, 1)
  state, tx = train_state(config, mesh)
  moved = jax.tree.map(lambda x: x + 0.25, state.batch_stats)
  state = state.replace(step=state.step + 3, batch_stats=moved)
  with checkpoints.create_manager(str(tmp_path)) as manager:
    checkpoints.save(manager, state, force=True)
    manager.wait_until_finished()
    target, _ = train_state(config, mesh, seed=1)
    restored = checkpoints.restore_state(manager, target, 3)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))
  variables, step = checkpoints.restore_params(config, str(tmp_path), mesh_of(2, 2))
  assert step == 3
  np.testing.assert_array_equal(variables['bn4']['var'], moved['bn4']['var'])
  np.testing.assert_array_equal(variables['conv4']['kernel'], state.params['conv4']['kernel'])
  # A run started from it (init_from) takes the running averages with their layers,
  # except those of a layer it reinitialises; the loop splits them back (train.py).
  config_lib.save(config, str(tmp_path))
  new = small_config(model='alexnet_bn', init_from=str(tmp_path), reinit=('fc8',))
  initial, _ = train_state(new, mesh, seed=2)
  started, _ = checkpoints.init_from(
    new, steps.model_variables(initial.params, initial.batch_stats), mesh
  )
  params, stats = steps.split_variables(started, initial.batch_stats)
  jax.tree.map(np.testing.assert_array_equal, stats, jax.device_get(moved))
  np.testing.assert_array_equal(params['conv4']['kernel'], state.params['conv4']['kernel'])
  np.testing.assert_array_equal(params['fc8']['kernel'], initial.params['fc8']['kernel'])


def test_a_checkpoint_without_bn_is_as_before_batch_stats_existed(tmp_path):
  """A model without BN saves no batch_stats: its checkpoints hold step, params and
  opt_state, and one written as that tree (before the field existed) restores."""
  params = {'conv1': {'kernel': jnp.ones((3, 3)), 'bias': jnp.zeros(3)}}
  tx = optax.sgd(0.1, momentum=0.9)
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  assert state.batch_stats == {}
  with checkpoints.create_manager(str(tmp_path)) as manager:
    old = {'step': state.step + 2, 'params': state.params, 'opt_state': state.opt_state}
    manager.save(2, args=ocp.args.StandardSave(old))
    checkpoints.save(manager, state.replace(step=state.step + 4), force=True)
    manager.wait_until_finished()
    for step in (2, 4):
      assert set(manager.item_metadata(step)) == {'step', 'params', 'opt_state'}
      restored = checkpoints.restore_state(manager, state, step)
      assert int(restored.step) == step and restored.batch_stats == {}


def test_the_model_key_is_checked_and_fixes_the_shapes(tmp_path):
  with pytest.raises(config_lib.ConfigError, match='config.model'):
    config_lib.validate(small_config(model='resnet'))
  saved = small_config()
  with pytest.raises(config_lib.ConfigError, match="model: 'alexnet' -> 'alexnet_bn'"):
    config_lib.check_model_shapes(saved, small_config(model='alexnet_bn'), str(tmp_path))
  # A config.json written before the key existed is the paper's model.
  old = saved.to_dict()
  del old['model']
  with open(os.path.join(tmp_path, config_lib.CONFIG_FILE), 'w') as f:
    json.dump(old, f)
  assert config_lib.load(str(tmp_path)).model == 'alexnet'


@pytest.mark.slow
def test_eval_logits_use_the_running_averages():
  config = small_config(model='alexnet_bn', dropout_rate=0.0, init='he')
  mesh = mesh_of(1, 1)
  state, _ = train_state(config, mesh)
  train_graphdef, eval_graphdef = steps.graphdefs(config)
  variables = steps.model_variables(state.params, state.batch_stats)
  images = jnp.asarray(batch()['image'])
  train_logits, _ = sharding.sharded_apply(train_graphdef, variables, mesh)(
    variables, images, jax.random.key(0)
  )
  eval_logits = steps.eval_apply(mesh, eval_graphdef, variables)(variables, images)
  # Running averages (0, 1) leave the activations unnormalised: another function.
  assert not np.allclose(eval_logits, train_logits, rtol=1e-2)
  model = nnx.merge(eval_graphdef, variables)
  stats = {name: (np.zeros(c), np.ones(c)) for name, c in (('bn2', 96), ('bn3', 256))}
  stats |= {name: (np.zeros(384), np.ones(384)) for name in ('bn4', 'bn5')}
  pool5 = features_reference(model, images, stats).reshape(8, -1)
  fc7 = jax.nn.relu(model.fc7(jax.nn.relu(model.fc6(pool5))))
  np.testing.assert_allclose(eval_logits, model.fc8(fc7), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.usefixtures('fashion_mnist_as_is', 'one_device')
def test_a_run_resumes_with_its_running_averages_and_evaluates_with_them(tmp_path):
  """Train 6 steps (checkpoints at 3 and 6); a run resumed from step 3 ends with the
  same parameters and running averages, and `--mode=eval` of the checkpoint gives the
  run's own last evaluation."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from alexnet_jax import evaluate  # pylint: disable=g-import-not-at-top
  from alexnet_jax import train  # pylint: disable=g-import-not-at-top

  config = small_config(model='alexnet_bn', eval_batch_size=12)
  full, resumed = str(tmp_path / 'full'), str(tmp_path / 'resumed')
  with tfds.testing.mock_data(num_examples=64):
    results = train.train_and_evaluate(config, full)
    shutil.copytree(
      os.path.join(full, 'checkpoints', '3'), os.path.join(resumed, 'checkpoints', '3')
    )
    resumed_results = train.train_and_evaluate(config, resumed)
    evaluated = evaluate.evaluate_checkpoint(config, full)

  def saved(workdir):
    with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')) as manager:
      tree = manager.restore(6)
    return tree['params'], tree['batch_stats']

  params, stats = saved(full)
  assert not np.allclose(stats['bn3']['var'], 1.0)  # Moved by training.
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
    (params, stats),
    saved(resumed),
  )
  for key in ('top1', 'loss'):
    assert results[f'test_{key}'] == pytest.approx(resumed_results[f'test_{key}'], rel=1e-6)
    assert results[f'test_{key}'] == pytest.approx(evaluated[key], rel=1e-5)


def test_the_large_batch_config_is_you_et_al_s_recipe():
  """configs/imagenet_large_batch.py against NVIDIA/caffe solver_8K.prototxt: batch 8192,
  100 epochs = 15,600 iterations, ramp-up 600 iterations, poly power 2, LARS η 0.001."""
  from configs import imagenet_large_batch  # pylint: disable=g-import-not-at-top

  config = imagenet_large_batch.get_config()
  config_lib.validate(config, num_devices=8)
  steps_per_epoch = 1_281_167 // config.batch_size  # 156, the solver's "epoch = 156".
  assert steps_per_epoch == 156
  assert config_lib.steps(config, 'total', steps_per_epoch) == 15_600
  # 600 iterations of the solver's exact epoch (1,281,167 / 8192 = 156.4 iterations).
  assert 597 <= config_lib.steps(config, 'warmup', steps_per_epoch) <= 600
  assert (config.model, config.optimizer, config.lr_schedule) == (
    'alexnet_bn',
    'lars',
    'polynomial',
  )
  assert config.batch_size % (4 * config.grad_accum_steps) == 0  # 8 GPUs: 4 × 2 towers.


def test_model_variables_join_params_and_running_averages_and_split_back():
  params = {'conv2': {'kernel': 1, 'bias': 2}, 'fc8': {'kernel': 3}}
  stats = {'bn2': {'mean': 4, 'var': 5}}
  joined = steps.model_variables(params, stats)
  assert joined == {'conv2': {'kernel': 1, 'bias': 2}, 'fc8': {'kernel': 3}, 'bn2': stats['bn2']}
  assert steps.split_variables(joined, stats) == (params, stats)
  assert steps.model_variables(params, {}) is params  # 'alexnet': the parameters as they are.
  config = small_config(model='alexnet_bn')
  shapes = jax.eval_shape(lambda: steps.init_variables(config, jax.random.key(0)))
  specs = sharding.partition_specs(steps.model_variables(*shapes))
  assert specs['bn2']['mean'] == specs['bn5']['var'] == jax.sharding.PartitionSpec('model')
