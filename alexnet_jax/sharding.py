"""The paper's two GPUs as a device mesh: towers on the 'model' axis, batch on 'data'.

Parameter placement is decided here only, by `PARTITION_RULES`; the model runs per
device inside `jax.shard_map` and communicates where the paper's GPUs did (Sec. 3.2).
"""

import functools
import os
import re
from collections.abc import Callable

from absl import logging
from flax import nnx
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

DATA_AXIS = 'data'
MODEL_AXIS = 'model'

# (regex on a leaf's path, spec); the first match wins. Every layer but fc8 splits
# its output units over the towers (conv kernels are HWIO, dense kernels (in, out));
# optimizer moments follow their parameters because their paths end the same way.
PARTITION_RULES = (
    (r'conv\d/kernel', P(None, None, None, MODEL_AXIS)),
    (r'(conv\d|fc6|fc7)/bias', P(MODEL_AXIS)),
    (r'fc[67]/kernel', P(None, MODEL_AXIS)),
    (r'.*', P()),  # fc8 (Fig. 2 draws it whole), step counters: replicated.
)


def initialize_distributed():
  """`jax.distributed.initialize()` when launched as one of several processes.

  SLURM (`srun` with more than one task) and an explicit coordinator address are
  detected; a single-process run does nothing.
  """
  if (int(os.environ.get('SLURM_NTASKS', '1')) > 1
      or 'JAX_COORDINATOR_ADDRESS' in os.environ):
    jax.distributed.initialize()
    logging.info('Process %d of %d.', jax.process_index(), jax.process_count())


def create_mesh(mesh_config: ml_collections.ConfigDict,
                devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A ('data', 'model') mesh over `devices` (default: all).

  `mesh_config.model`: 2 splits the towers over two devices as in the paper, 1 keeps
  both towers on every device, None picks 2 when the device count is even.
  `mesh_config.data`: -1 takes the remaining devices.

  Raises:
    ValueError: if `model` is not 1 or 2, or data × model != the device count.
  """
  devices = jax.devices() if devices is None else devices
  n = len(devices)
  model = mesh_config.model
  if model is None:
    model = 2 if n % 2 == 0 else 1
  if model not in (1, 2):
    raise ValueError(f'mesh.model={model}: use 2 (the paper\'s two towers on two '
                     'devices) or 1 (both towers on every device).')
  data = n // model if mesh_config.data == -1 else mesh_config.data
  if data * model != n:
    raise ValueError(f'mesh.data={mesh_config.data} × mesh.model={model} must equal the '
                     f'{n} devices present; set --config.mesh.data=-1 to use them all.')
  return jax.make_mesh((data, model), (DATA_AXIS, MODEL_AXIS), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def check_batch_sizes(mesh: jax.sharding.Mesh, config: ml_collections.ConfigDict,
                      *names: str):
  """Raises ValueError unless every `config.<name>` splits evenly over 'data'."""
  data = mesh.shape[DATA_AXIS]
  for name in names:
    if config[name] % data:
      raise ValueError(f'config.{name}={config[name]} must be divisible by the {data} '
                       "devices of the mesh's data axis.")


def partition_specs(tree):
  """A `PartitionSpec` for every leaf of `tree`, by its path and `PARTITION_RULES`."""
  def spec(path, _):
    name = jax.tree_util.keystr(path, simple=True, separator='/')
    return next(s for pattern, s in PARTITION_RULES if re.search(pattern, name))
  return jax.tree_util.tree_map_with_path(spec, tree)


def named_shardings(mesh: jax.sharding.Mesh, tree):
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), partition_specs(tree))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Batches are split over 'data' and replicated over the towers."""
  return NamedSharding(mesh, P(DATA_AXIS))


def global_batch(mesh: jax.sharding.Mesh, local_batch: dict[str, np.ndarray]
                 ) -> dict[str, jax.Array]:
  """This process's rows of a batch → global arrays split over 'data'."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def sharded_apply(graphdef: nnx.GraphDef, params, mesh: jax.sharding.Mesh) -> Callable:
  """`f(params, images, dropout_key) -> logits`, run per device with `shard_map`.

  Each device holds its tower's parameters (or both towers when 'model' has size 1)
  and its slice of the batch; `images` `[N, H, W, 3]` and the float32 logits
  `[N, classes]` are split over 'data'. Gradients through it are summed over
  'data' by `shard_map`'s transpose. On a one-device mesh it is the plain module.
  """
  def apply(params, images, dropout_key, **axes):
    model = nnx.merge(graphdef, params)
    return model(images, rngs=nnx.Rngs(dropout=dropout_key), **axes)

  if mesh.size == 1:
    # The plain module: shard_map would add a copy of every gradient (an all-reduce
    # over one device) that XLA:CPU does not remove.
    return apply
  per_device = functools.partial(apply, data_axis=DATA_AXIS, model_axis=MODEL_AXIS)
  return jax.shard_map(per_device, mesh=mesh,
                       in_specs=(partition_specs(params), P(DATA_AXIS), P()),
                       out_specs=P(DATA_AXIS))
