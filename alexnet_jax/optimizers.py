"""The paper's optimisation (Sec. 5) in Optax: SGD with momentum and weight decay,
biases as in the reference code, and the learning-rate schedules.
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


def create_learning_rate_schedule(
  config: ml_collections.ConfigDict, steps_per_epoch: int, num_steps: int
) -> optax.Schedule:
  """Learning rate per step, from `config.lr_schedule`.

  'step' is the paper's (Sec. 5): the rate divided by 10 (`lr_decay_factor`) at
  fixed steps or epochs (`lr_decay_steps` / `lr_decay_epochs`), standing in for
  "when the validation error rate stopped improving". 'cosine' warms up linearly
  over `warmup_steps` / `warmup_epochs`, then decays to 0 at `num_steps`. 'constant'
  is the base rate throughout.

  Raises:
    ValueError: for an unknown schedule name.
  """
  base = config.learning_rate
  if config.lr_schedule == 'constant':
    return optax.constant_schedule(base)
  if config.lr_schedule == 'step':
    return optax.piecewise_constant_schedule(
      base,
      {
        step: config.lr_decay_factor
        for step in config_lib.steps(config, 'lr_decay', steps_per_epoch)
      },
    )
  if config.lr_schedule == 'cosine':
    warmup = config_lib.steps(config, 'warmup', steps_per_epoch)
    return optax.warmup_cosine_decay_schedule(0.0, base, warmup, max(num_steps, warmup + 1))
  raise ValueError(
    f"Unknown lr_schedule {config.lr_schedule!r}: use 'step', 'cosine' or 'constant'."
  )


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


def create_optimizer(
  config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
  """SGD with momentum and weight decay (Sec. 5), biases as in the reference code.

  Weights: g = grad + weight_decay * w. Biases: g = bias_lr_multiplier *
  (grad + bias_weight_decay * b), i.e. twice the rate and no decay by default:
  Caffe's lr_mult 2, decay_mult 0 (bvlc_alexnet train_val.prototxt). The paper uses
  "an equal learning rate for all layers" (Sec. 5); cuda-convnet2 gives biases a
  schedule of their own (epsB from 2× to 20× epsW over the run, see
  configs/default.py).
  `config.lr_multipliers` then scales g per layer (Caffe's per-layer lr_mult, on top
  of the bias one); a layer with factor 0 is frozen: `optax.set_to_zero` in an
  `optax.partition`, so it gets no update, no weight decay and keeps no momentum.
  Then `config.momentum_form`: 'paper' applies `paper_momentum`; 'optax' applies
  `optax.sgd(schedule, momentum)`, whose momentum accumulates unscaled gradients.
  Without multipliers the chain (and so the checkpoint's optimizer state) is as it
  was before they existed.

  Raises:
    ValueError: for an unknown momentum_form.
  """
  if config.momentum_form == 'paper':
    momentum = paper_momentum(schedule, config.momentum)
  elif config.momentum_form == 'optax':
    momentum = optax.sgd(schedule, momentum=config.momentum)
  else:
    raise ValueError(f"Unknown momentum_form {config.momentum_form!r}: use 'paper' or 'optax'.")
  factor = functools.partial(layer_multiplier, config)
  scales = [  # One per factor other than 0 and 1, on the layers that have it.
    optax.masked(optax.scale(f), _by_layer(lambda layer, f=f: factor(layer) == f))
    for f in sorted({factor(layer) for layer in models.LAYERS} - {0.0, 1.0})
  ]
  sgd = optax.chain(
    optax.masked(optax.add_decayed_weights(config.weight_decay), _is_weight),
    optax.masked(optax.add_decayed_weights(config.bias_weight_decay), _is_bias),
    optax.masked(optax.scale(config.bias_lr_multiplier), _is_bias),
    *scales,
    momentum,
  )
  if all(factor(layer) for layer in models.LAYERS):
    return sgd
  return optax.partition(
    {'trained': sgd, 'frozen': optax.set_to_zero()},
    _by_layer(lambda layer: 'trained' if factor(layer) else 'frozen'),
  )
