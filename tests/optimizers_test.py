"""Tests of the paper's update (Sec. 5) and the schedules against hand-written formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alexnet_jax import config_lib
from alexnet_jax import optimizers
from configs import imagenet
from helpers import small_config


def toy_params():
  return {
    'conv1': {'kernel': jnp.array([1.0, -2.0]), 'bias': jnp.array([0.5])},
    'fc8': {'kernel': jnp.array([[3.0]]), 'bias': jnp.array([-1.0, 2.0])},
  }


def toy_grads(params):
  """Gradient of sum(w^2) + sum(w): 2 w + 1, so the updates depend on the weights."""
  return jax.tree.map(lambda w: 2 * w + 1, params)


def test_paper_momentum_across_a_learning_rate_drop():
  """Sec. 5, by hand: v <- 0.9 v - lr (g + 0.0005 w) for weights, v <- 0.9 v - 2 lr g for
  biases (twice the rate, no decay: cuda-convnet2 / Caffe); w <- w + v; lr 0.1 then
  0.01 from step 3 on."""
  config = small_config(momentum=0.9, weight_decay=5e-4)
  schedule = optax.piecewise_constant_schedule(0.1, {3: 0.1})
  tx = optimizers.create_optimizer(config, schedule)
  params = toy_params()
  opt_state = tx.init(params)
  ref = jax.tree.map(np.asarray, params)
  velocity = jax.tree.map(np.zeros_like, ref)
  for step in range(6):
    lr = 0.1 if step < 3 else 0.01
    updates, opt_state = tx.update(toy_grads(params), opt_state, params)
    params = optax.apply_updates(params, updates)
    for layer in ref:
      w, b = ref[layer]['kernel'], ref[layer]['bias']
      velocity[layer]['kernel'] = 0.9 * velocity[layer]['kernel'] - lr * (2 * w + 1 + 5e-4 * w)
      velocity[layer]['bias'] = 0.9 * velocity[layer]['bias'] - 2 * lr * (2 * b + 1)
      ref[layer] = {'kernel': w + velocity[layer]['kernel'], 'bias': b + velocity[layer]['bias']}
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), params, ref)


def test_optax_momentum_form_rescales_the_whole_momentum():
  """'optax': m <- 0.9 m + g; w <- w - lr m. After the drop it moves less than 'paper'."""
  config = small_config(
    momentum=0.9, weight_decay=0.0, bias_lr_multiplier=1.0, momentum_form='optax'
  )
  schedule = optax.piecewise_constant_schedule(0.1, {2: 0.1})
  params = {'fc8': {'kernel': jnp.array([1.0]), 'bias': jnp.array([1.0])}}
  grads = {'fc8': {'kernel': jnp.array([1.0]), 'bias': jnp.array([1.0])}}
  moved = {}
  for form in ('optax', 'paper'):
    config.momentum_form = form
    tx = optimizers.create_optimizer(config, schedule)
    p, state = params, tx.init(params)
    for _ in range(3):
      updates, state = tx.update(grads, state, p)
      p = optax.apply_updates(p, updates)
    moved[form] = float(1.0 - p['fc8']['kernel'][0])
  # optax: 0.1 * 1 + 0.1 * 1.9 + 0.01 * 2.71; paper: 0.1 + (0.09 + 0.1) + (0.171 + 0.01).
  assert moved['optax'] == pytest.approx(0.1 + 0.19 + 0.0271, rel=1e-5)
  assert moved['paper'] == pytest.approx(0.1 + 0.19 + 0.181, rel=1e-5)


def test_step_schedule_divides_by_ten_at_the_given_epochs_bit_for_bit():
  """The paper's schedule, exactly: 0.01 multiplied by 0.1 in float32 at each decay."""
  config = imagenet.get_config()
  schedule = optimizers.create_learning_rate_schedule(config, steps_per_epoch=10, num_steps=900)
  f = np.float32
  expected = [f(0.01), f(0.01), f(0.01) * f(0.1), f(0.01) * f(0.1)]
  expected += [expected[-1] * f(0.1)] * 2 + [expected[-1] * f(0.1) * f(0.1)] * 2
  got = [np.float32(schedule(s)) for s in (0, 299, 300, 599, 600, 799, 800, 899)]
  np.testing.assert_array_equal(got, expected)


def schedule_values(steps, **overrides):
  config = small_config(**overrides)
  schedule = optimizers.create_learning_rate_schedule(config, steps_per_epoch=10, num_steps=200)
  return [float(schedule(s)) for s in steps]


@pytest.mark.parametrize('name', ['step', 'constant', 'polynomial'])
def test_every_schedule_warms_up_linearly_from_zero(name):
  """20 warm-up steps (2 epochs of 10): 0.1 * t / 20, then the schedule's own value."""
  got = schedule_values(
    [0, 5, 19, 20],
    learning_rate=0.1,
    lr_schedule=name,
    warmup_steps=None,
    warmup_epochs=2.0,
    lr_decay_epochs=(10,),
  )
  np.testing.assert_allclose(got, [0.0, 0.025, 0.095, 0.1], rtol=1e-6, atol=1e-9)


def test_step_schedule_after_a_warm_up_decays_at_the_absolute_steps():
  got = schedule_values(
    [20, 49, 50, 99, 100],
    learning_rate=0.1,
    lr_schedule='step',
    warmup_steps=20,
    lr_decay_steps=(50, 100),
  )
  np.testing.assert_allclose(got, [0.1, 0.1, 0.01, 0.01, 0.001], rtol=1e-6)


def test_polynomial_schedule_decays_to_zero_with_power_two():
  """You et al. 2017: base * (1 - t / T)^2, t and T counted after the 40-step warm-up."""
  steps = [40, 80, 120, 199, 200, 250]
  got = schedule_values(steps, learning_rate=2.0, lr_schedule='polynomial', warmup_steps=40)
  expected = [2.0 * max(1 - (s - 40) / 160, 0) ** 2 for s in steps]
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
  assert expected[-2:] == [0.0, 0.0]
  cubic = schedule_values(
    [120], learning_rate=2.0, lr_schedule='polynomial', lr_poly_power=3.0, warmup_steps=0
  )
  assert cubic[0] == pytest.approx(2.0 * (1 - 120 / 200) ** 3, rel=1e-5)


@pytest.mark.parametrize('name', ['step', 'cosine', 'polynomial', 'constant'])
def test_reference_batch_scales_the_rate_linearly(name):
  """Goyal et al. 2017: batch 8 with reference batch 2 gives 4× the rate at every step,
  warm-up included."""
  steps = [3, 7, 30, 150]
  keys = dict(learning_rate=0.01, lr_schedule=name, lr_decay_steps=(25,), warmup_steps=5)
  plain = schedule_values(steps, **keys)
  scaled = schedule_values(steps, lr_reference_batch=2, **keys)
  np.testing.assert_allclose(scaled, 4 * np.array(plain), rtol=1e-6)
  assert plain[0] == pytest.approx(0.01 * 3 / 5)


def test_decays_that_fall_on_the_same_step_are_refused_naming_them():
  """Epochs 1.01 and 1.04 both round to step 10 at 10 steps per epoch."""
  config = small_config(lr_schedule='step', lr_decay_epochs=(1.01, 1.04, 3))
  with pytest.raises(config_lib.ConfigError, match=r'lr_decay_epochs.*same step.*\[10\]'):
    optimizers.create_learning_rate_schedule(config, steps_per_epoch=10, num_steps=100)
  config = small_config(lr_schedule='step', lr_decay_steps=(5, 5))
  with pytest.raises(config_lib.ConfigError, match=r'lr_decay_steps.*\[5\]'):
    optimizers.create_learning_rate_schedule(config, steps_per_epoch=10, num_steps=100)


def test_a_decay_within_the_warm_up_is_refused():
  config = small_config(lr_schedule='step', warmup_steps=30, lr_decay_steps=(20, 60))
  with pytest.raises(config_lib.ConfigError, match=r'lr_decay_steps.*\[20\].*warm-up'):
    optimizers.create_learning_rate_schedule(config, steps_per_epoch=10, num_steps=100)


def test_warmup_cosine_schedule_of_the_default_run():
  """Linear from 0 over 300 steps, then base * (1 + cos(pi t / T)) / 2 to 0 at the end."""
  config = small_config(learning_rate=0.02, lr_schedule='cosine', warmup_steps=300)
  schedule = optimizers.create_learning_rate_schedule(config, steps_per_epoch=468, num_steps=2340)
  for step in (0, 150, 299, 300, 1000, 2000, 2340):
    if step < 300:
      expected = 0.02 * step / 300
    else:
      expected = 0.01 * (1 + math.cos(math.pi * (step - 300) / (2340 - 300)))
    assert float(schedule(step)) == pytest.approx(expected, abs=1e-7), step
  epochs = small_config(lr_schedule='cosine', warmup_steps=None, warmup_epochs=0.5)
  warm = optimizers.create_learning_rate_schedule(epochs, steps_per_epoch=100, num_steps=400)
  assert float(warm(25)) == pytest.approx(epochs.learning_rate / 2)  # 50 warm-up steps.


def test_unknown_schedule_raises():
  with pytest.raises(ValueError, match='lr_schedule'):
    optimizers.create_learning_rate_schedule(small_config(lr_schedule='linear'), 10, 100)


def all_layers_params():
  """Every layer of the model, a kernel and a bias each: values that differ by layer."""
  return {
    layer: {'kernel': jnp.full((2,), 1.0 + i), 'bias': jnp.full((1,), -0.5 * i)}
    for i, layer in enumerate(('conv1', 'conv2', 'conv3', 'conv4', 'conv5', 'fc6', 'fc7', 'fc8'))
  }


def test_a_multiplier_of_10_gives_10_times_the_update_of_1_from_zero_momentum():
  """Caffe's lr_mult: the first step (zero momentum) of a layer with factor 10 moves it
  10× as far as with factor 1, biases included (on top of their ×2)."""
  params = all_layers_params()
  grads = toy_grads(params)
  moves = {}
  for factor in (1.0, 10.0):
    config = small_config(lr_multipliers=(('fc8', factor), ('conv[45]', 1.0)))
    tx = optimizers.create_optimizer(config, optax.constant_schedule(0.01))
    moves[factor], _ = tx.update(grads, tx.init(params), params)
  for layer in params:
    for kind in ('kernel', 'bias'):
      expected = (10.0 if layer == 'fc8' else 1.0) * np.asarray(moves[1.0][layer][kind])
      np.testing.assert_allclose(moves[10.0][layer][kind], expected, rtol=1e-6)
  # The factor-1 step is the paper's: -lr (g + wd w) for weights, -2 lr g for biases.
  w, b = np.asarray(params['fc8']['kernel']), np.asarray(params['fc8']['bias'])
  np.testing.assert_allclose(moves[1.0]['fc8']['kernel'], -0.01 * (2 * w + 1 + 5e-4 * w), rtol=1e-6)
  np.testing.assert_allclose(moves[1.0]['fc8']['bias'], -0.02 * (2 * b + 1), rtol=1e-6)


def test_a_frozen_layer_keeps_no_momentum_and_never_moves_while_the_others_do():
  """Factor 0: no update, no weight decay, no momentum state (Caffe's lr_mult 0)."""
  config = small_config(lr_multipliers=(('conv[1-5]', 0.0),))
  tx = optimizers.create_optimizer(config, optax.constant_schedule(0.01))
  params = all_layers_params()
  opt_state = tx.init(params)
  velocities = [
    jax.tree_util.keystr(path)
    for path, _ in jax.tree_util.tree_leaves_with_path(opt_state)
    if 'velocity' in jax.tree_util.keystr(path)
  ]
  assert velocities and not [v for v in velocities if "'conv" in v]
  start = params
  for _ in range(3):
    updates, opt_state = tx.update(toy_grads(params), opt_state, params)
    params = optax.apply_updates(params, updates)
  for layer in params:
    for kind in ('kernel', 'bias'):
      if layer.startswith('conv'):
        np.testing.assert_array_equal(params[layer][kind], start[layer][kind])
      else:
        assert np.all(np.asarray(params[layer][kind]) != np.asarray(start[layer][kind]))


def lars_reference(params, grads, velocity, lr, *, wd, eta, momentum, bias_factor):
  """You et al. 2017, Algorithm 1, in numpy: kernels u = g + wd w scaled by eta ||w|| /
  ||u||; biases (not adapted, not decayed) u = bias_factor g; v <- m v - lr u; w += v."""
  new_params, new_velocity = {}, {}
  for layer, leaves in params.items():
    new_params[layer], new_velocity[layer] = {}, {}
    for kind, w in leaves.items():
      w, g = np.asarray(w, np.float64), np.asarray(grads[layer][kind], np.float64)
      if kind == 'kernel':
        u = g + wd * w
        u = u * eta * np.linalg.norm(w) / np.linalg.norm(u)
      else:
        u = bias_factor * g
      v = momentum * velocity[layer][kind] - lr * u
      new_params[layer][kind], new_velocity[layer][kind] = w + v, v
  return new_params, new_velocity


def test_lars_updates_follow_the_layer_wise_trust_ratio():
  """Two LARS steps on a small pytree equal the numpy formula, the second with momentum;
  the kernels' steps are sized by eta ||w|| / ||g + wd w||, whatever the gradient's size."""
  config = small_config(
    optimizer='lars', lars_trust_coefficient=0.02, weight_decay=0.01, momentum=0.9
  )
  tx = optimizers.create_optimizer(config, optax.constant_schedule(0.5))
  params = {
    'conv1': {'kernel': jnp.array([[1.0, -2.0], [0.5, 3.0]]), 'bias': jnp.array([0.5, 0.0])},
    'fc8': {'kernel': jnp.array([[3.0, 4.0]]), 'bias': jnp.array([-1.0])},
  }
  opt_state = tx.init(params)
  ref = jax.tree.map(np.asarray, params)
  velocity = jax.tree.map(np.zeros_like, ref)
  for scale in (1.0, 100.0):
    grads = jax.tree.map(lambda w, s=scale: s * (2 * w + 1), params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    ref, velocity = lars_reference(
      ref,
      jax.tree.map(np.asarray, grads),
      velocity,
      0.5,
      wd=0.01,
      eta=0.02,
      momentum=0.9,
      bias_factor=2.0,
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), params, ref)


def test_lamb_first_step_is_the_trust_ratio_times_adams_sign_plus_decay():
  """LAMB (You et al. 2019, Algorithm 2), first step: Adam's direction m̂ / (sqrt(v̂) + eps)
  = g / (|g| + eps); kernels add wd w; every leaf is scaled by ||w|| / ||u||; biases get
  no decay and their ×2."""
  config = small_config(optimizer='lamb', weight_decay=0.1)
  tx = optimizers.create_optimizer(config, optax.constant_schedule(0.01))
  params = {'fc8': {'kernel': jnp.array([[3.0, -4.0]]), 'bias': jnp.array([1.0, -2.0])}}
  grads = {'fc8': {'kernel': jnp.array([[0.2, 0.5]]), 'bias': jnp.array([-3.0, 0.1])}}
  updates, _ = tx.update(grads, tx.init(params), params)
  for kind, decay, factor in (('kernel', 0.1, 1.0), ('bias', 0.0, 2.0)):
    w, g = np.asarray(params['fc8'][kind]), np.asarray(grads['fc8'][kind])
    u = g / (np.abs(g) + 1e-6) + decay * w
    expected = -0.01 * factor * np.linalg.norm(w) / np.linalg.norm(u) * u
    np.testing.assert_allclose(updates['fc8'][kind], expected, rtol=1e-5)


def test_batch_norm_parameters_are_neither_decayed_nor_adapted():
  """A later model's BN leaves (e.g. 'bn1/scale') are `NOT_ADAPTED`, matched by path."""
  params = {
    'conv1': {'kernel': jnp.ones(2), 'bias': jnp.ones(2)},
    'bn1': {'scale': jnp.ones(2), 'bias': jnp.ones(2), 'mean': jnp.ones(2)},
    'conv1_norm': {'scale': jnp.ones(2)},
  }
  adapted = optimizers._is_adapted(params)  # pylint: disable=protected-access
  assert jax.tree.leaves(adapted) == [False] * 4 + [True, False]  # Keys sorted: bn1 first.


@pytest.mark.parametrize('name', ['lars', 'lamb'])
def test_adaptive_optimizers_compose_with_multipliers_and_freezing(name):
  """Factor 10 on fc8 moves it 10× as far as factor 1 (after the trust ratio, which
  would cancel it before); factor 0 on the convs freezes them and keeps no state."""
  params = all_layers_params()
  grads = toy_grads(params)
  moves = {}
  for factor in (1.0, 10.0):
    config = small_config(optimizer=name, lr_multipliers=(('fc8', factor), ('conv[1-5]', 0.0)))
    tx = optimizers.create_optimizer(config, optax.constant_schedule(0.01))
    opt_state = tx.init(params)
    moves[factor], opt_state = tx.update(grads, opt_state, params)
  for kind in ('kernel', 'bias'):
    np.testing.assert_allclose(
      moves[10.0]['fc8'][kind], 10 * np.asarray(moves[1.0]['fc8'][kind]), rtol=1e-5
    )
    np.testing.assert_allclose(moves[10.0]['fc7'][kind], moves[1.0]['fc7'][kind], rtol=1e-6)
  state_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(opt_state)]
  assert not [p for p in state_paths if "'conv" in p]
  start, p = params, params
  for _ in range(3):
    updates, opt_state = tx.update(toy_grads(p), opt_state, p)
    p = optax.apply_updates(p, updates)
  for layer in p:
    for kind in ('kernel', 'bias'):
      moved = np.any(np.asarray(p[layer][kind]) != np.asarray(start[layer][kind]))
      assert moved != layer.startswith('conv'), (layer, kind)


def test_an_unknown_optimizer_is_refused_naming_the_key():
  with pytest.raises(config_lib.ConfigError, match=r"config.optimizer='adam'.*'sgd', 'lars'"):
    optimizers.create_optimizer(small_config(optimizer='adam'), optax.constant_schedule(0.1))
  with pytest.raises(config_lib.ConfigError, match=r"config.optimizer='adam': must be one of"):
    config_lib.validate(small_config(optimizer='adam'))


def test_sgd_keys_are_refused_under_lars():
  with pytest.raises(config_lib.ConfigError, match=r'config.bias_weight_decay=0.1 is for'):
    config_lib.validate(small_config(optimizer='lars', bias_weight_decay=0.1))
  with pytest.raises(config_lib.ConfigError, match=r"config.momentum_form='optax' is for"):
    config_lib.validate(small_config(optimizer='lamb', momentum_form='optax'))
