"""What config keys mean: one validation of every key, durations in steps or epochs,
and the run's config saved in its workdir (`config.json`) and checked on reruns.
"""

import json
import numbers
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

from absl import logging
import ml_collections

from alexnet_jax import files
from alexnet_jax import models


class ConfigError(ValueError):
  """A config key has a value that the run cannot use; the message names the key."""


# Durations: each is given in steps or in epochs; a `*_steps` value that is not None
# wins over its `*_epochs` partner (as `--config.num_train_steps=N` overrides
# num_epochs), so an override needs one key only. Resolved by `steps` alone.
DURATIONS = {
  'total': ('num_train_steps', 'num_epochs'),
  'warmup': ('warmup_steps', 'warmup_epochs'),
  'lr_decay': ('lr_decay_steps', 'lr_decay_epochs'),  # Sequences: one per decay.
  'log_every': ('log_every_steps', 'log_every_epochs'),
  'eval_every': ('eval_every_steps', 'eval_every_epochs'),
  'checkpoint_every': ('checkpoint_every_steps', 'checkpoint_every_epochs'),
}

DTYPES = ('float32', 'bfloat16', 'float16')

# Keys a rerun may change without changing the run: where the data live, the
# devices, and bookkeeping. Any other change alters the model, the data order or
# the schedule, and `check_rerun` refuses it.
RERUN_MAY_CHANGE = (
  'data_dir',
  'manual_dir',
  'mesh.data',
  'mesh.model',
  'eval_batch_size',
  'eval_crops',
  # The same batch's mean gradient, only in other micro-batches (memory); dropout's
  # masks are drawn per micro-batch, and a BN model's statistics are each
  # micro-batch's: the differences.
  'grad_accum_steps',
  'keep_checkpoints',
  *DURATIONS['log_every'],
  *DURATIONS['eval_every'],
  *DURATIONS['checkpoint_every'],
)
# Keys that fix the parameters' shapes (and, for `model`, the network itself).
MODEL_SHAPE_KEYS = ('model', 'num_classes', 'image_size')
# Keys that fix the function a checkpoint computes on an image file: its shapes, the
# LRN arithmetic, and the test-time input (resize rule and size, normalisation). The
# same parameters under other values give other logits, so evaluating, predicting or
# importing under them is refused (`check_same_function`).
FUNCTION_KEYS = (*MODEL_SHAPE_KEYS, 'lrn', 'resize', 'resize_size', 'pixel_mean', 'pixel_std')

CONFIG_FILE = 'config.json'


# --------------------------------------------------------------------------------------
# Validation.

_Rule = tuple[Callable[[Any], bool], str]  # (accepts the value, what is allowed)


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _int(low: int) -> _Rule:
  return (lambda v: _is_int(v) and v >= low), f'an integer >= {low}'


def _number(low: float, high: float | None = None, *, low_open=False, high_open=False) -> _Rule:
  def accepts(v):
    if not _is_number(v) or v != v:  # NaN.
      return False
    above = v > low if low_open else v >= low
    below = high is None or (v < high if high_open else v <= high)
    return above and below

  interval = (
    f'{"(" if low_open else "["}{low}, '
    f'{"inf)" if high is None else str(high) + (")" if high_open else "]")}'
  )
  return accepts, f'a number in {interval}'


def _choice(*values) -> _Rule:
  return (lambda v: v in values), 'one of ' + ', '.join(repr(v) for v in values)


def _optional(rule: _Rule) -> _Rule:
  accepts, allowed = rule
  return (lambda v: v is None or accepts(v)), f'None or {allowed}'


def _sequence(rule: _Rule, length: int | None = None) -> _Rule:
  accepts, allowed = rule
  count = f'{length} ' if length else ''
  return (
    (
      lambda v: (
        isinstance(v, Sequence)
        and not isinstance(v, str)
        and (length is None or len(v) == length)
        and all(map(accepts, v))
      )
    ),
    f'a sequence of {count}values, each {allowed}',
  )


_BOOL = (lambda v: isinstance(v, bool)), 'True or False'
_STRING = (lambda v: isinstance(v, str) and bool(v)), 'a non-empty string'
_POSITIVE_INT = _int(1)

RULES: dict[str, _Rule] = {
  'dataset': _STRING,  # Checked against TFDS's names when the data are read.
  'data_dir': _optional(_STRING),
  'manual_dir': _optional(_STRING),
  'train_split': _STRING,
  'test_split': _STRING,
  'num_classes': _int(2),
  'classes': _sequence(_int(0)),
  'train_examples_per_class': _optional(_POSITIVE_INT),
  'cache': _BOOL,
  'shuffle_buffer': _POSITIVE_INT,
  'deterministic_input': _BOOL,
  'prepared': _BOOL,
  'prepared_format': _choice('jpeg', 'raw'),
  'prepared_jpeg_quality': ((lambda v: _is_int(v) and 1 <= v <= 100), 'an integer in [1, 100]'),
  'image_size': _int(67),  # The smallest input with a 1×1 pool5.
  'resize_size': _int(67),
  'resize': _choice('shorter_side', 'square', 'pad'),
  'augment.crop': _choice('paper', 'inception'),
  'augment.flip': _BOOL,
  'augment.pca_lighting_stddev': _number(0),
  'pixel_mean': _sequence(_number(0, 255), 3),
  'pixel_std': _sequence(_number(0, low_open=True), 3),
  'model': _choice('alexnet', 'alexnet_bn', 'alexnet_owt'),
  'init': _choice('paper', 'he'),
  'lrn': _choice(*models.LRN_CONVENTIONS),
  'dropout_rate': _number(0, 1, high_open=True),
  'dtype': _choice(*DTYPES),
  'init_from': _optional(_STRING),
  'init_from_step': _optional(_int(0)),
  'reinit': _sequence(_STRING),
  'init_from_allowed_changes': _sequence(
    _choice(*(k for k in FUNCTION_KEYS if k != 'num_classes'))
  ),
  'lr_multipliers': _sequence(
    (
      lambda v: (
        isinstance(v, Sequence) and len(v) == 2 and _STRING[0](v[0]) and _number(0)[0](v[1])
      ),
      'a (layer regex, factor >= 0) pair',
    )
  ),
  'batch_size': _POSITIVE_INT,
  'eval_batch_size': _POSITIVE_INT,
  'grad_accum_steps': _POSITIVE_INT,
  'eval_crops': _choice(1, 2, 10),
  'learning_rate': _number(0, low_open=True),
  'lr_reference_batch': _optional(_POSITIVE_INT),
  'lr_schedule': _choice('step', 'cosine', 'polynomial', 'constant'),
  'lr_decay_steps': _optional(_sequence(_int(1))),
  'lr_decay_epochs': _optional(_sequence(_number(0, low_open=True))),
  'lr_decay_factor': _number(0, 1, low_open=True),
  'lr_poly_power': _number(0, low_open=True),
  'warmup_steps': _optional(_int(0)),
  'warmup_epochs': _optional(_number(0)),
  'optimizer': _choice('sgd', 'lars', 'lamb'),
  'lars_trust_coefficient': _number(0, low_open=True),
  'momentum': _number(0, 1, high_open=True),
  'momentum_form': _choice('paper', 'optax'),
  'weight_decay': _number(0),
  'bias_lr_multiplier': _number(0, low_open=True),
  'bias_weight_decay': _number(0),
  'num_train_steps': _optional(_POSITIVE_INT),
  'num_epochs': _optional(_number(0, low_open=True)),
  'mesh.data': _optional(_POSITIVE_INT),
  'mesh.model': _optional(_choice(1, 2)),
  'seed': _int(0),
  'log_every_steps': _optional(_POSITIVE_INT),
  'log_every_epochs': _optional(_number(0, low_open=True)),
  'eval_every_steps': _optional(_POSITIVE_INT),
  'eval_every_epochs': _optional(_number(0, low_open=True)),
  'checkpoint_every_steps': _optional(_POSITIVE_INT),
  'checkpoint_every_epochs': _optional(_number(0, low_open=True)),
  'keep_checkpoints': _POSITIVE_INT,
}


def flatten(config: ml_collections.ConfigDict, prefix: str = '') -> dict[str, Any]:
  """Every leaf by its dotted name, e.g. {'augment.flip': True, ...}."""
  leaves = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      leaves.update(flatten(value, f'{prefix}{key}.'))
    else:
      leaves[prefix + key] = value
  return leaves


def validate(
  config: ml_collections.ConfigDict, *, num_devices: int | None = None, num_processes: int = 1
):
  """Checks every key's type and range, and how the keys fit together.

  Runs before any data is read or any step compiled. With `num_devices`, also
  checks the mesh (`mesh.data` × `mesh.model` = the devices) and that both batch
  sizes split over the mesh's 'data' axis and the processes.

  Raises:
    ConfigError: naming the first bad key, its value and what is allowed.
  """
  leaves = flatten(config)
  for key, value in leaves.items():
    if key not in RULES:
      raise ConfigError(f'config.{key}={value!r}: unknown key; valid keys: {", ".join(RULES)}.')
    accepts, allowed = RULES[key]
    if not accepts(value):
      raise ConfigError(f'config.{key}={value!r}: must be {allowed}.')
  if config.dataset != 'image_folder' and not _is_tfds_dataset(config.dataset):
    raise ConfigError(
      f"config.dataset={config.dataset!r}: must be 'image_folder' or the "
      "name of a TFDS dataset, e.g. 'fashion_mnist', 'cifar10', "
      "'imagenet2012'."
    )
  missing = [key for key in RULES if key not in leaves]
  if missing:
    raise ConfigError(f'config lacks {", ".join(missing)} (start from configs/default.py).')
  _validate_transfer(config)
  if config.image_size > config.resize_size:
    raise ConfigError(
      f'config.image_size={config.image_size} must be <= '
      f'config.resize_size={config.resize_size} (crops are taken from '
      'the resized image).'
    )
  for name, (steps_key, epochs_key) in DURATIONS.items():
    if name != 'lr_decay' and config[steps_key] is None and config[epochs_key] is None:
      raise ConfigError(
        f'config.{steps_key} and config.{epochs_key} are both None: set one of them.'
      )
  if (
    config.lr_schedule == 'step'
    and config.lr_decay_steps is None
    and (config.lr_decay_epochs is None)
  ):
    raise ConfigError(
      "config.lr_schedule='step' needs config.lr_decay_epochs or config.lr_decay_steps."
    )
  if config.batch_size % config.grad_accum_steps:
    raise ConfigError(
      f'config.batch_size={config.batch_size} must be divisible by '
      f'config.grad_accum_steps={config.grad_accum_steps} (the micro-batches are equal).'
    )
  if config.optimizer != 'sgd':
    for key, sgd_value in (('bias_weight_decay', 0.0), ('momentum_form', 'paper')):
      if config[key] != sgd_value:
        raise ConfigError(
          f'config.{key}={config[key]!r} is for config.optimizer=sgd only: '
          f'{config.optimizer} never decays biases and has its own momentum; '
          f'leave config.{key}={sgd_value!r}.'
        )
  if num_devices is not None:
    _validate_layout(config, num_devices, num_processes)


def _unmatched(patterns) -> str | None:
  """The first of `patterns` (regexes) that fullmatches none of `models.LAYERS`."""
  for pattern in patterns:
    try:
      if not any(re.fullmatch(pattern, layer) for layer in models.LAYERS):
        return pattern
    except re.error:
      return pattern
  return None


def _validate_transfer(config: ml_collections.ConfigDict):
  """Layer patterns that match a layer, and classes that fit num_classes."""
  for key, patterns in (
    ('reinit', config.reinit),
    ('lr_multipliers', [pattern for pattern, _ in config.lr_multipliers]),
  ):
    if (pattern := _unmatched(patterns)) is not None:
      raise ConfigError(
        f'config.{key}: {pattern!r} matches no layer; the layers are '
        f'{", ".join(models.LAYERS)} (patterns are regexes on the whole name, e.g. '
        "'fc8' or 'conv[1-5]')."
      )
  if config.reinit and not config.init_from:
    raise ConfigError(
      f'config.reinit={tuple(config.reinit)!r} needs config.init_from: the workdir of the '
      'run to start the other layers from (e.g. --config.init_from=runs/source).'
    )
  if len(set(config.classes)) != len(config.classes):
    raise ConfigError(f'config.classes={tuple(config.classes)!r}: each id may appear once.')
  if config.classes and len(config.classes) != config.num_classes:
    raise ConfigError(
      f'config.classes has {len(config.classes)} ids but config.num_classes='
      f'{config.num_classes}: set --config.num_classes={len(config.classes)}.'
    )


def _is_tfds_dataset(name: str) -> bool:
  # Imported here: TFDS pulls in TensorFlow, which the steps (sharding, which imports
  # this module) must not need.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    tfds.builder_cls(name)
  except tfds.core.registered.DatasetNotFoundError:
    return False
  return True


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int]:
  """(data, model) for `num_devices`: `model` None is 2 when the count is even,
  `data` None takes the remaining devices.

  Raises:
    ConfigError: if the product is not the device count.
  """
  model = mesh_config.model
  if model is None:
    model = 2 if num_devices % 2 == 0 else 1
  data = num_devices // model if mesh_config.data is None else mesh_config.data
  if data * model != num_devices:
    raise ConfigError(
      f'config.mesh.data={mesh_config.data} × config.mesh.model={model} must equal the '
      f'{num_devices} devices present; leave config.mesh.data=None to use them all.'
    )
  return data, model


def _validate_layout(config, num_devices: int, num_processes: int):
  data, model = mesh_shape(config.mesh, num_devices)
  # Each device on the 'data' axis gets an equal share of the batch; the processes
  # then read whole shares (see `sharding.data_groups`).
  for key in ('batch_size', 'eval_batch_size'):
    if config[key] % data:
      raise ConfigError(
        f'config.{key}={config[key]} must be divisible by the {data} devices of the '
        f"mesh's data axis (mesh {data} × {model} over {num_processes} process(es))."
      )
  if config.batch_size % (data * config.grad_accum_steps):
    raise ConfigError(
      f'config.batch_size={config.batch_size} must be divisible by the {data} devices of '
      f"the mesh's data axis × config.grad_accum_steps={config.grad_accum_steps}: each "
      'device splits its rows into that many micro-batches.'
    )


# --------------------------------------------------------------------------------------
# Durations.


def steps(config: ml_collections.ConfigDict, name: str, steps_per_epoch: int):
  """The duration `name` of `DURATIONS` in steps (a list for 'lr_decay').

  `*_steps`, when not None, is taken as it is; otherwise `*_epochs` × steps_per_epoch,
  rounded to the nearest step (at least 1 for periods and the total).

  Raises:
    ConfigError: if both keys are None (a schedule without decays gives []).
  """
  steps_key, epochs_key = DURATIONS[name]
  if config[steps_key] is not None:
    value = config[steps_key]
    return list(value) if name == 'lr_decay' else int(value)
  epochs = config[epochs_key]
  if epochs is None:
    if name == 'lr_decay':
      return []
    raise ConfigError(f'config.{steps_key} and config.{epochs_key} are both None.')
  if name == 'lr_decay':
    return [round(e * steps_per_epoch) for e in epochs]
  value = round(epochs * steps_per_epoch)
  return value if name == 'warmup' else max(value, 1)


# --------------------------------------------------------------------------------------
# The run's config in its workdir.


def _to_python(value):
  if isinstance(value, list):
    return tuple(_to_python(v) for v in value)
  if isinstance(value, dict):
    return {k: _to_python(v) for k, v in value.items()}
  return value


# Keys added after runs were saved without them (issue 28, 2026-12-04): what every
# earlier run did, so its workdir still evaluates, and resumes without a "changed
# config". The LARS and polynomial keys did nothing before (SGD, no polynomial
# schedule): their defaults.
_BEFORE_THE_KEY = {
  'model': 'alexnet',
  'optimizer': 'sgd',
  'lars_trust_coefficient': 0.001,
  'lr_reference_batch': None,
  'lr_poly_power': 2.0,
  'grad_accum_steps': 1,
}


def load(workdir: str) -> ml_collections.ConfigDict | None:
  """The config saved in `workdir/config.json` by its training run; None if absent.
  A config.json older than a key of `_BEFORE_THE_KEY` gets that key's earlier value."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return ml_collections.ConfigDict({**_BEFORE_THE_KEY, **_to_python(json.load(f))})


def save(config: ml_collections.ConfigDict, workdir: str):
  """Writes the resolved config to `workdir/config.json` (atomically)."""
  files.write_json(os.path.join(workdir, CONFIG_FILE), config.to_dict(), sort_keys=True)


def differences(
  old: ml_collections.ConfigDict, new: ml_collections.ConfigDict
) -> dict[str, tuple[Any, Any]]:
  """{dotted key: (old value, new value)} where they differ; tuples equal lists."""
  old_leaves, new_leaves = flatten(old), flatten(new)
  return {
    key: (old_leaves.get(key), new_leaves.get(key))
    for key in sorted(set(old_leaves) | set(new_leaves))
    if _to_python(old_leaves.get(key)) != _to_python(new_leaves.get(key))
  }


def _describe(changes: dict[str, tuple[Any, Any]]) -> str:
  return '; '.join(f'{key}: {old!r} -> {new!r}' for key, (old, new) in changes.items())


def check_model_shapes(
  saved: ml_collections.ConfigDict | None, config: ml_collections.ConfigDict, workdir: str
):
  """Refuses a config whose parameter shapes differ from those of the run in `workdir`.

  Raises:
    ConfigError: naming the keys that differ.
  """
  if saved is None:
    return
  changed = {k: v for k, v in differences(saved, config).items() if k in MODEL_SHAPE_KEYS}
  if changed:
    raise ConfigError(
      f'The run in {workdir} has other parameter shapes ({_describe(changed)}); pass its '
      f'own config, or leave out --config to use {os.path.join(workdir, CONFIG_FILE)}.'
    )


def function_differences(
  reference: ml_collections.ConfigDict, config: ml_collections.ConfigDict
) -> dict[str, tuple[Any, Any]]:
  """{key: (reference value, config value)} for the `FUNCTION_KEYS` that differ."""
  return {k: v for k, v in differences(reference, config).items() if k in FUNCTION_KEYS}


def check_same_function(
  saved: ml_collections.ConfigDict | None,
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  allow_change: bool = False,
):
  """Refuses to use the checkpoints of the run in `workdir` under a config that makes
  them compute another function (`FUNCTION_KEYS`: shapes, LRN, test-time input).

  Other shapes are always refused (the parameters would not fit); with
  `allow_change` the other keys' changes are logged and let through.

  Raises:
    ConfigError: naming every key that differs, with both values.
  """
  if saved is None:
    return
  check_model_shapes(saved, config, workdir)
  changed = function_differences(saved, config)
  if changed and not allow_change:
    raise ConfigError(
      f'The run in {workdir} was trained with other values of keys that change what its '
      f'parameters compute ({_describe(changed)}); its checkpoints would give other '
      f'logits. Leave out --config and these --config.KEY overrides to use '
      f'{os.path.join(workdir, CONFIG_FILE)}, or pass --allow_config_change to evaluate '
      'under them anyway.'
    )
  if changed:
    logging.warning('Using the run in %s with a changed config: %s', workdir, _describe(changed))


def check_same_classes(
  saved: ml_collections.ConfigDict | None, config: ml_collections.ConfigDict, workdir: str
):
  """Refuses to read the outputs of the run in `workdir` (evaluate, predict, plot) under
  another `classes`: its output k is the k-th id of the run's own list (of all the
  dataset's when empty), and another list would score and name it as another class.
  (The layers below, as `features` reads them, do not depend on it.)

  Raises:
    ConfigError: naming the key and both values.
  """
  if saved is None or _to_python(saved.classes) == _to_python(config.classes):
    return
  raise ConfigError(
    f'The run in {workdir} was trained with config.classes={tuple(saved.classes)!r} (its '
    f'outputs, in that order), not {tuple(config.classes)!r}: use its own, e.g. leave out '
    f'--config.classes and --config to use {os.path.join(workdir, CONFIG_FILE)}.'
  )


def check_rerun(
  config: ml_collections.ConfigDict, workdir: str, *, allow_change: bool = False
) -> dict[str, tuple[Any, Any]]:
  """Compares a rerun's config with the one its workdir was started with.

  Changes to `RERUN_MAY_CHANGE` keys pass. Any other change would make the resumed
  run differ from the one that was started (model, data order or schedule): it is
  refused, unless `allow_change`, when it is logged and returned for the caller to
  record.

  Returns:
    The changes, {dotted key: (old, new)}; {} for a new workdir.

  Raises:
    ConfigError: for a refused change, naming every changed key.
  """
  saved = load(workdir)
  if saved is None:
    return {}
  check_model_shapes(saved, config, workdir)
  changes = {k: v for k, v in differences(saved, config).items() if k not in RERUN_MAY_CHANGE}
  if changes and not allow_change:
    raise ConfigError(
      f'{workdir} holds a run started with another config ({_describe(changes)}). '
      'Resuming it with these values would not continue the same run: use a new '
      '--workdir, or pass --allow_config_change to continue with them (recorded in '
      'config_changes.jsonl).'
    )
  if changes:
    logging.warning('Continuing %s with a changed config: %s', workdir, _describe(changes))
  return changes


def for_workdir(
  workdir: str,
  given: ml_collections.ConfigDict | None,
  overrides: dict[str, Any] | None = None,
  *,
  allow_change: bool = False,
) -> ml_collections.ConfigDict:
  """The config to evaluate, plot or predict with a trained run's checkpoints.

  `given` (a --config) when not None, else the run's own `config.json` with
  `overrides` (dotted keys) on top; refused if it makes the run's parameters compute
  another function (`check_same_function`; `allow_change` lets all but shapes pass).
  The mesh is the machine's, not the run's: a run's `mesh.data` and `mesh.model`
  are reset to None (chosen from the devices present), unless `overrides` set
  them, so a run trained on two GPUs with `mesh.model=2` is evaluated on one device.

  Raises:
    ConfigError: for another function, or with neither a config nor a config.json.
  """
  saved = load(workdir)
  if given is not None:
    check_same_function(saved, given, workdir, allow_change=allow_change)
    return given
  if saved is None:
    raise ConfigError(
      f'{os.path.join(workdir, CONFIG_FILE)} does not exist (a run that '
      'predates it, or not a training workdir): pass --config=CONFIG.'
    )
  config = ml_collections.ConfigDict(saved.to_dict())
  config.mesh.update(data=None, model=None)
  config.update_from_flattened_dict(overrides or {})
  check_same_function(saved, config, workdir, allow_change=allow_change)
  config.lock()
  return config
