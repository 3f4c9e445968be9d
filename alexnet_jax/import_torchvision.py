"""Reads a state dict of torchvision's AlexNet (e.g. its IMAGENET1K_V1 weights,
alexnet-owt-7be5be79.pth) and writes it as a workdir of `AlexNetOWT` (config.model
'alexnet_owt'). torch is needed for this command only (requirements-bench.txt).

  python -m alexnet_jax.import_torchvision --state_dict=alexnet-owt-7be5be79.pth --workdir=DIR
"""

import os
import sys
from typing import Any

from absl import app
from absl import flags
from flax import nnx
import ml_collections
from ml_collections import config_flags
import numpy as np

from alexnet_jax import checkpoints
from alexnet_jax import config_lib
from alexnet_jax import layouts
from alexnet_jax import models

# torchvision/models/alexnet.py: the state-dict prefix of each parameter layer (the
# indices of `features` and `classifier` in its nn.Sequentials).
TORCHVISION_LAYERS = {
  'conv1': 'features.0',
  'conv2': 'features.3',
  'conv3': 'features.6',
  'conv4': 'features.8',
  'conv5': 'features.10',
  'fc6': 'classifier.1',
  'fc7': 'classifier.4',
  'fc8': 'classifier.6',
}
_CONV_LAYERS = tuple(models.OWT_CONVS)

# The config values under which the converted weights compute torchvision's function
# (configs/torchvision_alexnet.py takes them from here); `import_state_dict` refuses
# any other. torchvision's AlexNet_Weights.IMAGENET1K_V1 transforms,
# ImageClassification(crop_size=224) (torchvision/transforms/_presets.py): resize the
# shorter side to 256 (bilinear, antialiased), centre crop 224, RGB scaled to [0, 1],
# minus mean (0.485, 0.456, 0.406), divided by std (0.229, 0.224, 0.225); here the
# same on the 0-255 scale (255 × each).
TORCHVISION_CONVENTIONS = {
  'model': 'alexnet_owt',
  'resize': 'shorter_side',
  'resize_size': 256,
  'image_size': 224,
  'pixel_mean': (123.675, 116.28, 103.53),
  'pixel_std': (58.395, 57.12, 57.375),
}

_TORCH_MISSING = (
  'torch is needed to read a PyTorch state dict: pip install -r requirements-bench.txt '
  '(or pip install torch).'
)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The tensors of a `torch.save`d state dict, as float32 numpy arrays.

  Loaded with `torch.load(path, weights_only=True, map_location='cpu')`: tensors and
  containers only, no code run from the file. A checkpoint of torchvision's reference
  training script (references/classification/train.py: {'model': state_dict,
  'optimizer': ..., ...}) gives its 'model' entry.

  Raises:
    ImportError: if torch is not installed, saying how to install it.
    FileNotFoundError: if `path` does not exist.
    ValueError: naming `path`, if it does not load as a dict of tensors.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top  (this command's only use)
  except ImportError as e:
    raise ImportError(_TORCH_MISSING) from e
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist.')
  try:
    loaded = torch.load(path, weights_only=True, map_location='cpu')
  except Exception as e:  # pylint: disable=broad-except  (pickle, zip and torch errors alike)
    raise ValueError(f'{path} is not a PyTorch state dict: {type(e).__name__}: {e}') from e
  if isinstance(loaded, dict) and isinstance(loaded.get('model'), dict):
    loaded = loaded['model']
  if not isinstance(loaded, dict) or not all(torch.is_tensor(v) for v in loaded.values()):
    raise ValueError(f'{path} is not a PyTorch state dict (a dict of tensors).')
  return {name: t.detach().to(torch.float32).numpy() for name, t in loaded.items()}


def _torch_shape(key: str, array: np.ndarray, expected: tuple[int, ...]) -> np.ndarray:
  if array.shape != expected:
    raise ValueError(f'{key}: expected shape {expected}, found {array.shape}.')
  return array


def torchvision_to_params(state_dict: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
  """torchvision AlexNet's state dict as `AlexNetOWT(num_classes)` params.

  Conversions, from PyTorch's layouts to the model's:
    * `Conv2d.weight` `(out, in, kh, kw)` → HWIO `(kh, kw, in, out)`; inputs stay RGB.
    * `Linear.weight` `(out, in)` → `(in, out)`.
    * fc6's inputs permuted: torchvision flattens the 6 × 6 adaptive pool `(C, H, W)` in
      (c, h, w) order, the model's `reshape` of NHWC in (h, w, c) order.
  fc8 may have any number of classes (`classifier.6.weight`'s rows).

  Args:
    state_dict: `torchvision.models.alexnet()`'s `state_dict()` as numpy arrays
      (`read_state_dict`), keys `features.0.weight`, ..., `classifier.6.bias`.

  Returns:
    `{'conv1': {'kernel': ..., 'bias': ...}, ..., 'fc8': {...}}`, float32 numpy arrays
    of `nnx.to_pure_dict(nnx.state(model, nnx.Param))`'s shapes.

  Raises:
    ValueError: if a key is missing or unexpected (naming them: another network's
      state dict), or a tensor's shape is not torchvision AlexNet's (naming the key,
      the expected and the found shape).
  """
  expected_keys = {
    f'{p}.{kind}' for p in TORCHVISION_LAYERS.values() for kind in ('weight', 'bias')
  }
  missing = sorted(expected_keys - set(state_dict))
  unexpected = sorted(set(state_dict) - expected_keys)
  if missing or unexpected:
    raise ValueError(
      "Not torchvision's AlexNet state dict: "
      + '; '.join(
        f'{what}: {", ".join(keys)}'
        for what, keys in (('missing', missing), ('unexpected', unexpected))
        if keys
      )
      + '.'
    )
  fc8 = state_dict['classifier.6.weight']
  if fc8.ndim != 2:
    raise ValueError(f'classifier.6.weight: expected shape (classes, 4096), found {fc8.shape}.')
  model = nnx.eval_shape(lambda: models.AlexNetOWT(fc8.shape[0], rngs=nnx.Rngs(0)))
  target = nnx.to_pure_dict(nnx.state(model, nnx.Param))

  params = {}
  for name, prefix in TORCHVISION_LAYERS.items():
    kernel_shape = target[name]['kernel'].shape
    weight_key = f'{prefix}.weight'
    if name in _CONV_LAYERS:
      h, w, i, o = kernel_shape
      kernel = layouts.conv_kernel(_torch_shape(weight_key, state_dict[weight_key], (o, i, h, w)))
    else:
      fan_in, fan_out = kernel_shape
      weights = _torch_shape(weight_key, state_dict[weight_key], (fan_out, fan_in))
      kernel = layouts.dense_kernel(weights, models.OWT_POOL5_SIZE if name == 'fc6' else None)
    bias_key = f'{prefix}.bias'
    bias = _torch_shape(bias_key, state_dict[bias_key], target[name]['bias'].shape)
    params[name] = {'kernel': kernel, 'bias': np.ascontiguousarray(bias, np.float32)}
  return params


def check_torchvision_conventions(config: ml_collections.ConfigDict):
  """Refuses a config under which torchvision's weights compute another function.

  Raises:
    config_lib.ConfigError: naming each key of `TORCHVISION_CONVENTIONS` that differs.
  """
  layouts.check_conventions(
    config, TORCHVISION_CONVENTIONS, 'torchvision', 'configs/torchvision_alexnet.py'
  )


def import_state_dict(
  state_dict: str, workdir: str, config: ml_collections.ConfigDict
) -> dict[str, Any]:
  """Writes the weights of the state dict file `state_dict` as checkpoint 0 of
  `workdir`, with `config.json` (`checkpoints.write_imported_workdir`: whole or not at
  all); `--mode=eval`, predict, features, plots and `config.init_from` then read it.

  Returns:
    {'workdir', 'num_classes', 'parameters'}.

  Raises:
    config_lib.ConfigError: if `config` differs from `TORCHVISION_CONVENTIONS` (naming
      each key), before anything is read.
    ImportError: without torch.
    FileNotFoundError: if `state_dict` does not exist.
    ValueError: for a file that is not torchvision AlexNet's state dict, an fc8 whose
      class count differs from `config.num_classes`, or a workdir that is not empty.
  """
  check_torchvision_conventions(config)
  checkpoints.check_import_workdir(workdir)
  params = torchvision_to_params(read_state_dict(state_dict))
  num_classes = params['fc8']['bias'].shape[0]
  if num_classes != config.num_classes:
    raise ValueError(
      f'{state_dict} has {num_classes} classes (classifier.6) but '
      f'config.num_classes={config.num_classes}: pass --config.num_classes={num_classes}.'
    )
  return {
    'workdir': checkpoints.write_imported_workdir(workdir, params, config),
    'num_classes': num_classes,
    'parameters': sum(x.size for p in params.values() for x in p.values()),
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = flags.FLAGS.config
  try:
    config_lib.validate(config)
    summary = import_state_dict(flags.FLAGS.state_dict, flags.FLAGS.workdir, config)
  except (ImportError, FileNotFoundError, ValueError) as e:
    sys.exit(f'{type(e).__name__}: {e}')
  print(
    f'Wrote {summary["parameters"]:,} parameters ({summary["num_classes"]} classes) '
    f'to {summary["workdir"]}; evaluate with: python -m alexnet_jax.main --mode=eval '
    f'--workdir={summary["workdir"]} --config.manual_dir=IMAGENET_TARS'
  )


if __name__ == '__main__':
  flags.DEFINE_string(
    'state_dict',
    None,
    "torchvision AlexNet's state dict (alexnet-owt-7be5be79.pth).",
    required=True,
  )
  flags.DEFINE_string(
    'workdir', None, 'Where to write the checkpoint and config.json.', required=True
  )
  config_flags.DEFINE_config_file(
    'config',
    'configs/torchvision_alexnet.py',
    "torchvision's network and preprocessing.",
    lock_config=True,
  )
  app.run(main)
