"""The paper's optimisation (Sec. 5) in Optax: SGD with momentum and weight decay,
biases as in the reference code, LARS and LAMB for large batches, and the schedules.
"""

import functools
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from alexnet_jax import config_lib
from alexnet_jax import models


def base_learning_rate(config: ml_collections.ConfigDict) -> float:
  """`config.learning_rate`, scaled to the batch when `config.lr_reference_batch` is set.

  None: the rate as given. N: rate × batch_size / N, Goyal et al. 2017's linear
  scaling rule ("Accurate, Large Minibatch SGD", Sec. 2.1: multiply the rate by k
  when the batch grows k-fold), so one config keeps its meaning from 2 to N GPUs.
  """
  if config.lr_reference_batch is None:
    return config.learning_rate
  return config.learning_rate * config.batch_size / config.lr_reference_batch


def decay_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> list[int]:
  """The steps at which 'step' divides the rate (`lr_decay_steps` / `lr_decay_epochs`).

  Raises:
    ConfigError: if two decays fall on the same step (they would count once), or one
      falls within the warm-up.
  """
  points = config_lib.steps(config, 'lr_decay', steps_per_epoch)
  key = 'lr_decay_steps' if config.lr_decay_steps is not None else 'lr_decay_epochs'
  same = sorted({p for p in points if points.count(p) > 1})
  if same:
    raise config_lib.ConfigError(
      f'config.{key}={tuple(config[key])!r}: decays fall on the same step(s) {same} '
      f'({steps_per_epoch} steps per epoch), where they would count once; give '
      'distinct points, or a smaller lr_decay_factor for a larger drop.'
    )
  warmup = config_lib.steps(config, 'warmup', steps_per_epoch)
  early = [p for p in points if p <= warmup]
  if warmup and early:
    raise config_lib.ConfigError(
      f'config.{key}={tuple(config[key])!r}: decay(s) at step(s) {early} fall within '
      f'the {warmup}-step warm-up; decay after it, or shorten the warm-up.'
    )
  return points


def create_learning_rate_schedule(
  config: ml_collections.ConfigDict, steps_per_epoch: int, num_steps: int
) -> optax.Schedule:
  """Learning rate per step (float32 scalar of the int step), from `config.lr_schedule`.

  The peak rate is `base_learning_rate(config)`. Every schedule first warms up
  linearly from 0 over `warmup_steps` / `warmup_epochs` (Goyal et al. 2017, Sec. 2.2:
  5 epochs), then: 'step' is the paper's (Sec. 5): the rate divided by 10
  (`lr_decay_factor`) at fixed steps or epochs (`lr_decay_steps` / `lr_decay_epochs`,
  counted from step 0), standing in for "when the validation error rate stopped
  improving". 'cosine' decays as (1 + cos(pi t / T)) / 2 and 'polynomial' as
  (1 - t / T)^`lr_poly_power` (You et al. 2017, "Large Batch Training of Convolutional
  Networks": power 2), both to 0 at `num_steps`, t counted from the warm-up's end.
  'constant' is the peak rate throughout. Without warm-up, 'step' and 'constant' are
  the Optax schedules they always were.

  Raises:
    ConfigError: for decays that coincide or fall within the warm-up (`decay_steps`).
    ValueError: for an unknown schedule name.
  """
  base = base_learning_rate(config)
  warmup = config_lib.steps(config, 'warmup', steps_per_epoch)
  if config.lr_schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, base, warmup, max(num_steps, warmup + 1))
  if config.lr_schedule == 'constant':
    after = optax.constant_schedule(base)
  elif config.lr_schedule == 'step':
    # After the warm-up `join_schedules` counts from its end: shift the decays back.
    after = optax.piecewise_constant_schedule(
      base,
      {step - warmup: config.lr_decay_factor for step in decay_steps(config, steps_per_epoch)},
    )
  elif config.lr_schedule == 'polynomial':
    after = optax.polynomial_schedule(base, 0.0, config.lr_poly_power, max(num_steps - warmup, 1))
  else:
    raise ValueError(
      f"Unknown lr_schedule {config.lr_schedule!r}: use 'step', 'cosine', 'polynomial' or "
      "'constant'."
    )
  if not warmup:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, base, warmup), after], [warmup])


class PaperMomentumState(NamedTuple):
  count: jax.Array  # int32 scalar: updates so far, the schedule's step.
  velocity: optax.Updates  # v, the last update itself.


def paper_momentum(
  learning_rate: optax.ScalarOrSchedule, momentum: float
) -> optax.GradientTransformation:
  """The paper's momentum (Sec. 5): v <- momentum * v - lr * g; the update is v.

  With g = grad + weight_decay * w (from `optax.add_decayed_weights` before it)
  and w <- w + v (`optax.apply_updates`), this is Sec. 5's rule exactly. Unlike
  `optax.sgd(lr, momentum)` (v <- momentum * v + g; w <- w - lr * v), the rate
  multiplies each gradient once, when it enters v: a drop of the rate acts on new
  gradients only, as in cuda-convnet2 and Caffe's SGDSolver.
  """

  def init(params):
    return PaperMomentumState(
      count=jnp.zeros([], jnp.int32), velocity=jax.tree.map(jnp.zeros_like, params)
    )

  def update(updates, state, params=None):
    del params
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    velocity = jax.tree.map(lambda v, g: momentum * v - lr * g, state.velocity, updates)
    return velocity, PaperMomentumState(optax.safe_increment(state.count), velocity)

  return optax.GradientTransformation(init, update)


def _is_bias(params):
  return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == 'bias', params)


def _is_weight(params):
  return jax.tree.map(lambda bias: not bias, _is_bias(params))


def layer_multiplier(config: ml_collections.ConfigDict, layer: str) -> float:
  """`layer`'s rate factor: the first `config.lr_multipliers` pattern that fullmatches
  it, else 1."""
  for pattern, factor in config.lr_multipliers:
    if re.fullmatch(pattern, layer):
      return float(factor)
  return 1.0


def _by_layer(value_of_layer):
  """A function of the params giving each leaf `value_of_layer(its layer's name)`: an
  Optax mask or partition label."""
  return lambda params: {
    layer: jax.tree.map(functools.partial(lambda value, _: value, value_of_layer(layer)), subtree)
    for layer, subtree in params.items()
  }


# Parameters that LARS and LAMB neither decay nor scale by a trust ratio, by their
# '/'-joined path: biases (e.g. 'fc8/bias') and batch-norm parameters (any leaf of a
# module whose name holds 'bn' or 'norm', e.g. 'bn1/scale'). As google-research/simclr's
# LARS (lars_optimizer.py, `exclude_from_weight_decay` and
# `exclude_from_layer_adaptation` = ['batch_normalization', 'bias'] in run.py) and
# TF Model Garden's (official/modeling/optimization/lars_optimizer.py): a bias's or a
# BN scale's norm says nothing of the step it needs. NVIDIA/caffe's LARC, which You et
# al.'s AlexNet runs used, adapts every blob, biases included (sgd_solver.cpp,
# GetLocalRate: rate = (1 - momentum) * larc_eta * ||w|| / ||g||, 1 while ||w|| = 0,
# in place of lr_mult); here a bias steps at the global rate times bias_lr_multiplier.
NOT_ADAPTED = r'(.*/)?bias|(.*/)?[^/]*(bn|norm)[^/]*/.*'

OPTIMIZERS = ('sgd', 'lars', 'lamb')


def _path(path) -> str:
  return '/'.join(str(getattr(key, 'key', key)) for key in path)


def _is_adapted(params):
  """True for the leaves LARS and LAMB decay and adapt: every one not `NOT_ADAPTED`."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: not re.fullmatch(NOT_ADAPTED, _path(path)), params
  )


def _is_not_adapted(params):
  return jax.tree.map(lambda adapted: not adapted, _is_adapted(params))


def _layer_scales(config: ml_collections.ConfigDict) -> list[optax.GradientTransformation]:
  """`config.lr_multipliers`' factors other than 0 and 1, each on the layers that have it."""
  factor = functools.partial(layer_multiplier, config)
  return [
    optax.masked(optax.scale(f), _by_layer(lambda layer, f=f: factor(layer) == f))
    for f in sorted({factor(layer) for layer in models.LAYERS} - {0.0, 1.0})
  ]


def _paper_sgd(config: ml_collections.ConfigDict, schedule: optax.Schedule):
  if config.momentum_form == 'paper':
    momentum = paper_momentum(schedule, config.momentum)
  elif config.momentum_form == 'optax':
    momentum = optax.sgd(schedule, momentum=config.momentum)
  else:
    raise ValueError(f"Unknown momentum_form {config.momentum_form!r}: use 'paper' or 'optax'.")
  return optax.chain(
    optax.masked(optax.add_decayed_weights(config.weight_decay), _is_weight),
    optax.masked(optax.add_decayed_weights(config.bias_weight_decay), _is_bias),
    optax.masked(optax.scale(config.bias_lr_multiplier), _is_bias),
    *_layer_scales(config),
    momentum,
  )


def _adaptive(config: ml_collections.ConfigDict, schedule: optax.Schedule):
  if config.optimizer == 'lars':
    tx = optax.lars(
      schedule,
      weight_decay=config.weight_decay,
      weight_decay_mask=_is_adapted,
      trust_coefficient=config.lars_trust_coefficient,
      trust_ratio_mask=_is_adapted,
      momentum=config.momentum,
    )
  else:
    tx = optax.lamb(schedule, weight_decay=config.weight_decay, mask=_is_adapted)
  # After the trust ratio, which would cancel any factor applied before it. Both
  # optimizers end in linear maps (LARS: rate, then momentum; LAMB: rate), so a
  # constant factor here equals one on the gradient entering the momentum.
  return optax.chain(
    tx, optax.masked(optax.scale(config.bias_lr_multiplier), _is_bias), *_layer_scales(config)
  )


def create_optimizer(
  config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
  """`config.optimizer` with the rate `schedule`, biases as in the reference code.

  'sgd' is the paper's: SGD with momentum and weight decay (Sec. 5). Weights: g = grad
  + weight_decay * w. Biases: g = bias_lr_multiplier * (grad + bias_weight_decay * b),
  i.e. twice the rate and no decay by default: Caffe's lr_mult 2, decay_mult 0
  (bvlc_alexnet train_val.prototxt). The paper uses "an equal learning rate for all
  layers" (Sec. 5); cuda-convnet2 gives biases a schedule of their own (epsB from 2×
  to 20× epsW over the run, see configs/default.py). `config.lr_multipliers` then
  scales g per layer (Caffe's per-layer lr_mult, on top of the bias one). Then
  `config.momentum_form`: 'paper' applies `paper_momentum`; 'optax' applies
  `optax.sgd(schedule, momentum)`, whose momentum accumulates unscaled gradients.

  'lars' is `optax.lars` (You, Gitman & Ginsburg 2017, Algorithm 1): for each kernel
  w, u = g + weight_decay * w is scaled by lars_trust_coefficient * ||w|| / ||u|| (1
  where either norm is 0), then v <- momentum * v - lr * u; w <- w + v. 'lamb' is
  `optax.lamb` (You et al. 2019, "Large Batch Optimization for Deep Learning",
  Algorithm 2: Adam's direction, weight_decay added decoupled, then the trust ratio
  on every leaf as there). Under both, `NOT_ADAPTED` leaves (biases, BN parameters)
  get no weight decay and (LARS) no trust ratio; biases' updates are multiplied by
  bias_lr_multiplier, and layers' by their lr_multipliers, after the trust ratio.

  Whatever the optimizer, a layer with lr_multipliers factor 0 is frozen:
  `optax.set_to_zero` in an `optax.partition`, so it gets no update, no weight
  decay and keeps no optimizer state. Without multipliers the 'sgd' chain (and so
  the checkpoint's optimizer state) is as it was before they existed.

  Raises:
    ConfigError: for an unknown `config.optimizer`.
    ValueError: for an unknown momentum_form.
  """
  if config.optimizer == 'sgd':
    trained = _paper_sgd(config, schedule)
  elif config.optimizer in OPTIMIZERS:
    trained = _adaptive(config, schedule)
  else:
    raise config_lib.ConfigError(
      f'config.optimizer={config.optimizer!r}: must be one of '
      + ', '.join(repr(name) for name in OPTIMIZERS)
      + '.'
    )
  factor = functools.partial(layer_multiplier, config)
  if all(factor(layer) for layer in models.LAYERS):
    return trained
  return optax.partition(
    {'trained': trained, 'frozen': optax.set_to_zero()},
    _by_layer(lambda layer: 'trained' if factor(layer) else 'frozen'),
  )
