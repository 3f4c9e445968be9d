"""The paper's two GPUs as a device mesh: towers on the 'model' axis, batch on 'data'.

Parameter placement is decided here only, by `PARTITION_RULES`; the model runs per
device inside `jax.shard_map` and communicates where the paper's GPUs did (Sec. 3.2).
"""

import contextlib
import functools
import importlib
import os
import re
from collections.abc import Callable

from absl import logging
from flax import nnx
import jax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

from alexnet_jax import config_lib

DATA_AXIS = 'data'
MODEL_AXIS = 'model'

# (regex, spec), matched with `re.fullmatch` on a leaf's path, e.g. 'params/conv2/kernel'
# or 'opt_state/3/velocity/conv2/kernel' (optimizer state follows its parameter); the
# first match wins. Every layer but fc8 splits its output units over the towers (conv
# kernels are HWIO, dense kernels (in, out)); so do a BN model's per-channel running
# averages (e.g. 'batch_stats/bn2/mean', `models.TowerBatchNorm`).
_BATCH_STATS_RULE = r'(.*/)?bn[1-7]/(mean|var)'
PARTITION_RULES = (
  (r'(.*/)?conv[1-5]/kernel', P(None, None, None, MODEL_AXIS)),
  (_BATCH_STATS_RULE, P(MODEL_AXIS)),
  (r'(.*/)?(conv[1-5]|fc6|fc7)/bias', P(MODEL_AXIS)),
  (r'(.*/)?fc[67]/kernel', P(None, MODEL_AXIS)),
  (r'(.*/)?fc8/(kernel|bias)', P()),  # Fig. 2 draws fc8 whole: replicated.
  (r'.*', P()),  # Step counters.
)
_CATCH_ALL = PARTITION_RULES[-1][0]
# Rules that only some models' trees match (a model without BN has no running averages).
_OPTIONAL_RULES = (_BATCH_STATS_RULE,)


def _slurm_local_device_ids() -> list[int] | None:
  """All GPUs SLURM gave this task, when it started one task per node; else None.

  JAX's SLURM detection gives each process the one GPU numbered as its node-local
  task (`SLURM_LOCALID`): right for one task per GPU, but with one task per node (as
  README's and launch/sweep.py's `srun --ntasks-per-node=1`) every process would see
  GPU 0 alone. SLURM lists the task's GPUs in CUDA_VISIBLE_DEVICES (`--gpus-per-node`).
  """
  tasks_per_node = os.environ.get(
    'SLURM_STEP_TASKS_PER_NODE', os.environ.get('SLURM_TASKS_PER_NODE', '')
  )
  gpus = os.environ.get('CUDA_VISIBLE_DEVICES', '')
  if not re.fullmatch(r'1(\(x\d+\))?', tasks_per_node) or not gpus:
    return None  # Several tasks per node: JAX's one GPU per task.
  return list(range(len(gpus.split(','))))


# What JAX's SLURM detection reads (jax._src.clusters.slurm_cluster), and SLURM_STEP_ID:
# srun sets them all in each task of a job step. A shell of the allocation (salloc's,
# or sbatch's script run without srun) has SLURM_JOB_ID and SLURM_NTASKS but no step.
_SLURM_STEP_VARIABLES = (
  'SLURM_JOB_ID',
  'SLURM_STEP_ID',
  'SLURM_STEP_NODELIST',
  'SLURM_NTASKS',
  'SLURM_PROCID',
  'SLURM_LOCALID',
)


def _slurm_step_tasks() -> int | None:
  """The number of tasks in the srun job step this process is one of; None outside one.

  The step's own count (SLURM_STEP_NUM_TASKS): `srun --preserve-env` leaves
  SLURM_NTASKS at the allocation's.
  """
  if not all(v in os.environ for v in _SLURM_STEP_VARIABLES):
    return None
  return int(os.environ.get('SLURM_STEP_NUM_TASKS', os.environ['SLURM_NTASKS']))


def initialize_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  local_device_ids: list[int] | None = None,
):
  """Joins a multi-process job (`jax.distributed.initialize`), if launched as one.

  From the arguments (main.py's flags of the same names), or from SLURM's variables
  in a job step that `srun` started with more than one task (JAX reads SLURM_JOB_ID,
  SLURM_STEP_NODELIST, SLURM_PROCID, SLURM_LOCALID; the process count is the step's
  SLURM_STEP_NUM_TASKS; with one task per node, each process gets all of its node's
  GPUs). Without either this is a single-process run and nothing happens; also in a
  SLURM allocation of several tasks outside a job step (a command typed in `salloc`'s
  shell, or run by an sbatch script without srun), which logs a warning saying so:
  no peers would ever come. On CPU the processes exchange arrays through gloo, so the
  same job runs on CPU-only hosts.

  Raises:
    ValueError: if only part of a job's description is given, saying what is missing.
  """
  step_tasks = _slurm_step_tasks()
  slurm = step_tasks is not None and step_tasks > 1
  given = (coordinator_address, num_processes, process_id)
  if all(v is None for v in given) and not slurm:
    if 'JAX_COORDINATOR_ADDRESS' in os.environ:
      raise ValueError(
        f'JAX_COORDINATOR_ADDRESS={os.environ["JAX_COORDINATOR_ADDRESS"]} is set, but not '
        'the process count and id: pass --coordinator_address=HOST:PORT '
        '--num_processes=N --process_id=I to every process (or start them with srun).'
      )
    allocated = int(os.environ.get('SLURM_NTASKS', '1'))
    if step_tasks is None and 'SLURM_JOB_ID' in os.environ and allocated > 1:
      logging.warning(
        'SLURM job %s has %d tasks, but this process was not started by srun (no job '
        'step): running as a single process. Use `srun` to run %d processes.',
        os.environ['SLURM_JOB_ID'],
        allocated,
        allocated,
      )
    return
  if not slurm and any(v is None for v in given):
    raise ValueError(
      'A multi-process job needs --coordinator_address=HOST:PORT, --num_processes=N and '
      f'--process_id=I on every process (got {coordinator_address=}, {num_processes=}, '
      f'{process_id=}), or SLURM to provide them (srun).'
    )
  if slurm and num_processes is None:
    num_processes = step_tasks
  if slurm and local_device_ids is None:
    local_device_ids = _slurm_local_device_ids()
  # Before any backend starts: CPU collectives across processes (a no-op on GPUs).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
    coordinator_address, num_processes, process_id, local_device_ids=local_device_ids
  )
  logging.info(
    'Process %d of %d, %d local device(s) of %d.',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


# Bytes of a failure's description that `failures_agreed` sends to every process: a
# fixed size, as an all-gather needs one shape on all; longer ones are cut.
_FAILURE_BYTES = 4096


def _describe(error: Exception) -> np.ndarray:
  """uint8 [1 + _FAILURE_BYTES]: 1, then 'module.Type: message' in UTF-8, zero-padded."""
  kind = type(error)
  text = f'{kind.__module__}.{kind.__qualname__}: {error}'.encode()[:_FAILURE_BYTES]
  return np.frombuffer(b'\x01' + text.ljust(_FAILURE_BYTES, b'\0'), np.uint8)


def _rebuilt(description: np.ndarray) -> Exception:
  """The exception `_describe` described: its type when importable and built from one
  message, else RuntimeError with the type's name in front."""
  text = description[1:].tobytes().rstrip(b'\0').decode(errors='replace')
  name, _, message = text.partition(': ')
  module, _, qualname = name.rpartition('.')
  try:
    kind = functools.reduce(getattr, qualname.split('.'), importlib.import_module(module))
    if isinstance(kind, type) and issubclass(kind, Exception) and str(kind(message)) == message:
      return kind(message)
  except Exception:  # pylint: disable=broad-except  (any type we cannot rebuild)
    pass
  return RuntimeError(f'{name}: {message}')


@contextlib.contextmanager
def failures_agreed():
  """Runs its body on every process and raises on all of them if it raised on any.

  A check that fails on one process only (its part of the data, its host's copy of a
  file) would leave the others waiting in their next collective until JAX gives up
  (minutes); here every process learns of it at once. The first failing process's
  exception (by process index) is raised on each: its own object where it failed,
  elsewhere the same type with the same message (`str`), so every process exits with
  the same line. Exceptions that are not `Exception`s (KeyboardInterrupt, SystemExit)
  pass through unagreed.

  In a multi-process job this is a collective (an all-gather of uint8
  [1 + _FAILURE_BYTES] per process, after the body): every process must enter it, with
  or without work of its own inside. The body must hold no collective (e.g. Orbax's
  restore ends in a barrier): a process failing before it would meet the others'
  collective with its own. With one process it only runs the body.
  """
  if jax.process_count() == 1:
    yield
    return
  error = None
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except  (raised below, on every process)
    error = e
  mine = np.zeros(1 + _FAILURE_BYTES, np.uint8) if error is None else _describe(error)
  gathered = multihost_utils.process_allgather(mine)
  failed = np.flatnonzero(gathered[:, 0])
  if not len(failed):
    return
  first = int(failed[0])
  if first == jax.process_index():
    raise error
  if error is not None:  # Its own failure, told only here: all raise the first one's.
    logging.error('This process failed too: %s: %s', type(error).__name__, error)
  logging.error('Process %d of %d failed; stopping with it.', first, jax.process_count())
  raise _rebuilt(gathered[first])


def create_mesh(
  mesh_config: ml_collections.ConfigDict, devices: list[jax.Device] | None = None
) -> jax.sharding.Mesh:
  """A ('data', 'model') mesh over `devices` (default: all, of every process).

  `mesh_config.model`: 2 splits the towers over two devices as in the paper, 1 keeps
  both towers on every device, None picks 2 when the device count is even.
  `mesh_config.data`: None takes the remaining devices.

  Raises:
    config_lib.ConfigError: if data × model is not the device count.
  """
  devices = jax.devices() if devices is None else devices
  shape = config_lib.mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(
    shape, (DATA_AXIS, MODEL_AXIS), devices=devices, axis_types=(jax.sharding.AxisType.Auto,) * 2
  )


def _path(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator='/')


def _rule(name: str) -> str:
  return next(pattern for pattern, _ in PARTITION_RULES if re.fullmatch(pattern, name))


def partition_specs(tree):
  """A `PartitionSpec` for every leaf of `tree` (params, or a whole `TrainState`).

  Raises:
    ValueError: if a specific rule of `PARTITION_RULES` matches no leaf, or a kernel
      falls to the catch-all (a renamed layer would silently lose its tower split).
  """
  names = [_path(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  rules = {name: _rule(name) for name in names}
  unused = [
    p for p, _ in PARTITION_RULES[:-1] if p not in rules.values() and p not in _OPTIONAL_RULES
  ]
  if unused:
    raise ValueError(f'Partition rule(s) {unused} match no parameter of {sorted(names)}.')
  stray = [name for name, rule in rules.items() if rule == _CATCH_ALL and name.endswith('kernel')]
  if stray:
    raise ValueError(f'No partition rule for {stray}: add one to PARTITION_RULES.')
  return _specs_by_rule(tree)


def _specs_by_rule(tree):
  """Each leaf's spec from the first rule matching its path, unchecked."""
  specs = dict(PARTITION_RULES)
  return jax.tree_util.tree_map_with_path(lambda path, _: specs[_rule(_path(path))], tree)


def describe_partitioning(params) -> str:
  """One line per parameter: path, shape, spec and the rule that gave it."""
  specs = partition_specs(params)
  return '\n'.join(
    f'  {_path(path)} {tuple(x.shape)} -> {spec}  (rule {_rule(_path(path))!r})'
    for (path, x), spec in zip(
      jax.tree_util.tree_flatten_with_path(params)[0],
      jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P)),
      strict=True,
    )
  )


def named_shardings(mesh: jax.sharding.Mesh, tree):
  """`NamedSharding`s on `mesh` for every leaf of `tree` (see `partition_specs`)."""
  return jax.tree.map(
    lambda spec: NamedSharding(mesh, spec),
    partition_specs(tree),
    is_leaf=lambda s: isinstance(s, P),
  )


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """A whole copy on every device of `mesh` (metrics, logits to fetch)."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Batches are split over 'data' and replicated over the towers."""
  return NamedSharding(mesh, P(DATA_AXIS))


@functools.cache  # Asked once per batch; a mesh's groups never change.
def data_groups(mesh: jax.sharding.Mesh) -> tuple[int, int]:
  """(this process's group, the number of groups) of processes that feed the same rows.

  A global batch is split over 'data' only, so processes whose devices hold the
  same 'data' indices (e.g. the two towers of `mesh.model=2` on two processes with
  one device each) must feed identical rows; each group reads its own part of the
  data, 1/num_groups of every global batch. A single process is group 0 of 1.

  Raises:
    ValueError: if the processes' shares of the 'data' axis overlap without being
      equal, or differ in size (a mesh no batch layout fits).
  """
  size = mesh.shape[DATA_AXIS]
  shares = {}  # process -> the 'data' indices its devices hold.
  for device, index in batch_sharding(mesh).devices_indices_map((size,)).items():
    shares.setdefault(device.process_index, set()).update(range(size)[index[0]])
  groups = sorted({frozenset(share) for share in shares.values()}, key=min)
  covered = sorted(i for group in groups for i in group)
  if covered != list(range(size)) or len({len(g) for g in groups}) != 1:
    raise ValueError(
      f"The processes hold overlapping or unequal parts of the mesh's data "
      f'axis ({[sorted(g) for g in groups]}); use a mesh whose data axis '
      'splits evenly over the processes (e.g. mesh.data=None).'
    )
  return groups.index(frozenset(shares[jax.process_index()])), len(groups)


def global_batch(
  mesh: jax.sharding.Mesh, local_batch: dict[str, np.ndarray]
) -> dict[str, jax.Array]:
  """This process's rows of a batch → global arrays split over 'data'.

  Args:
    mesh: the ('data', 'model') mesh.
    local_batch: arrays of `[B / num_groups, ...]`, this process's group's share of
      the global batch of B rows (see `data_groups`), e.g. 'image' float32
      `[b, H, W, 3]` and 'label' int32 `[b]`.

  Returns:
    The same keys as `jax.Array`s of `[B, ...]`, rows split over 'data' and
    replicated over 'model'.

  Raises:
    ValueError: if the rows do not split evenly over this process's devices.
  """
  sharding = batch_sharding(mesh)
  _, num_groups = data_groups(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(
      sharding, x, (x.shape[0] * num_groups, *x.shape[1:])
    ),
    local_batch,
  )


def fetch(tree):
  """Numpy copies of global arrays, whole on every process (across processes this is a
  collective: every process must call it)."""

  def whole(x):
    if x.is_fully_addressable:
      return np.asarray(x)
    return multihost_utils.process_allgather(x, tiled=True)

  return jax.tree.map(whole, tree)


def sharded_apply(
  graphdef: nnx.GraphDef, params, mesh: jax.sharding.Mesh, layer: str = 'fc8'
) -> Callable:
  """`f(params, images, dropout_key) -> (logits, batch_stats)`, run per device with
  `shard_map`.

  `params` are the model's variables (`steps.model_variables`: the parameters and a
  BN model's running averages). Each device holds its tower's (or both towers' when
  'model' has size 1) and its slice of the batch; `images` `[N, H, W, 3]` and the
  float32 logits `[N, classes]` are split over 'data'. `batch_stats` are the running
  averages after the call (moved in train mode, as they were in eval mode; {} without
  BN), placed like the parameters. Gradients through it are summed over 'data' by
  `shard_map`'s transpose. On a one-device mesh it is the plain module. Another
  `layer` (`models.FEATURE_LAYERS`) gives that layer's whole activations `[N, D]`
  instead of the logits (`AlexNet.activations`).
  """

  def apply(params, images, dropout_key, **axes):
    model = nnx.merge(graphdef, params)
    out = model.activations(images, layer, rngs=nnx.Rngs(dropout=dropout_key), **axes)
    return out, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

  if mesh.size == 1:
    # The plain module: shard_map would add a copy of every gradient (an all-reduce
    # over one device) that XLA:CPU does not remove.
    return apply
  stats = jax.eval_shape(
    lambda p: nnx.to_pure_dict(nnx.state(nnx.merge(graphdef, p), nnx.BatchStat)), params
  )
  per_device = functools.partial(apply, data_axis=DATA_AXIS, model_axis=MODEL_AXIS)
  return jax.shard_map(
    per_device,
    mesh=mesh,
    in_specs=(partition_specs(params), P(DATA_AXIS), P()),
    out_specs=(P(DATA_AXIS), _specs_by_rule(stats)),
  )
