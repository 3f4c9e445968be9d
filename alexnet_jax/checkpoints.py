"""Orbax checkpoints of the train state: saved sharded by every process, restored onto
any mesh, the parameters alone without an optimizer; preemption across processes; one
trainer per workdir.
"""

import contextlib
import dataclasses
import datetime
import errno
import functools
import json
import os
import re
import shutil
import socket
import tempfile
from typing import Any

from absl import logging
import filelock
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from alexnet_jax import config_lib
from alexnet_jax import files
from alexnet_jax import sharding
from alexnet_jax import steps as steps_lib


def directory(workdir: str) -> str:
  """Where the run in `workdir` keeps its checkpoints: `<workdir>/checkpoints/<step>/`."""
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


# In the workdir: the trainer's lock, and who holds it (beside it: filelock may
# remove the lock file itself on release).
LOCK_FILE = 'train.lock'
HOLDER_FILE = 'train.lock.json'


class WorkdirInUse(ValueError):
  """Another trainer holds the workdir (`workdir_lock`)."""


def _holder(workdir: str) -> str:
  """Who holds `workdir`'s lock, from its `HOLDER_FILE`."""
  try:
    with open(os.path.join(workdir, HOLDER_FILE)) as f:
      holder = json.load(f)
    return f'pid {holder["pid"]} on host {holder["host"]}, started {holder["started"]}'
  except (OSError, ValueError, KeyError, TypeError):  # Being written, or from elsewhere.
    return f'a process that has not said who it is ({HOLDER_FILE} unreadable)'


def _acquire(workdir: str) -> filelock.FileLock | None:
  """Takes `workdir`'s lock without waiting and writes who holds it; None where the
  filesystem has no file locks (then logged: not enforced)."""
  os.makedirs(workdir, exist_ok=True)
  # No soft fallback: a lock file left by a killed process would block every rerun.
  lock = filelock.FileLock(os.path.join(workdir, LOCK_FILE), fallback_to_soft=False)
  try:
    lock.acquire(blocking=False)
  except filelock.Timeout as e:
    raise WorkdirInUse(
      f'{workdir} is in use by another trainer: {_holder(workdir)} (lock '
      f'{lock.lock_file}). Wait for it to end or stop it, or use another --workdir.'
    ) from e
  except OSError as e:
    if e.errno != errno.ENOSYS:
      raise
    logging.warning('%s has no file locks: a second trainer on it is not refused.', workdir)
    return None
  holder = {
    'host': socket.gethostname(),
    'pid': os.getpid(),
    'started': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
  }
  files.write_json(os.path.join(workdir, HOLDER_FILE), holder)
  return lock


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds `workdir/LOCK_FILE` while inside: one trainer per workdir.

  Two trainers on one workdir (a command typed twice, a requeued task beside the old
  one) would write the same checkpoints and corrupt them. The lock is `flock`'s
  (filelock), so the kernel releases it when its holder dies, however (kill -9
  included): a rerun is never blocked by a dead one. Its holder's host, pid and start
  time (UTC) are written beside it, to `HOLDER_FILE`.

  In a multi-process job process 0 holds it for the job and all processes learn the
  outcome (a collective: every process enters it).

  A second trainer is refused at once, not made to wait, as a second
  `alexnet_jax.prepare` of one copy is (`datasets._preparing`, by contrast, waits: a
  job there reuses what the holder prepares).

  Raises:
    WorkdirInUse: at once, if another trainer holds it, naming the workdir and the
      holder (on every process of the job).
  """
  workdir = os.path.abspath(workdir)
  lock = None
  with sharding.failures_agreed():
    if jax.process_index() == 0:
      lock = _acquire(workdir)
  try:
    yield
  finally:
    if lock is not None:
      with contextlib.suppress(FileNotFoundError):  # Before the release: not a successor's.
        os.remove(os.path.join(workdir, HOLDER_FILE))
      lock.release()


def one_trainer_per_workdir(train):
  """Decorates `train(config, workdir, ...)` to run inside `workdir_lock(workdir)`."""

  @functools.wraps(train)
  def holding_workdir(config, workdir, *args, **kwargs):
    with workdir_lock(workdir):
      return train(config, workdir, *args, **kwargs)

  return holding_workdir


def create_manager(
  workdir: str, *, save_interval_steps: int = 1, max_to_keep: int | None = None
) -> ocp.CheckpointManager:
  """The `CheckpointManager` of `workdir/checkpoints`, shared by every process.

  Saves are asynchronous and atomic (Orbax writes to a temporary directory and
  renames it when complete), so a killed run leaves its earlier checkpoints intact.
  """
  return ocp.CheckpointManager(
    directory(workdir),
    options=ocp.CheckpointManagerOptions(
      save_interval_steps=save_interval_steps, max_to_keep=max_to_keep
    ),
  )


def _checkpointed(state: steps_lib.TrainState) -> dict[str, Any]:
  """The tree a checkpoint holds: `state`'s fields, without `batch_stats` when empty (a
  model without BN), so such checkpoints are those written before the field existed."""
  tree = {field.name: getattr(state, field.name) for field in dataclasses.fields(state)}
  if not tree['batch_stats']:
    del tree['batch_stats']
  return tree


def save(manager: ocp.CheckpointManager, state: steps_lib.TrainState, *, force: bool = False):
  """Starts an asynchronous save of `state` at its step (every process calls it)."""
  manager.save(int(state.step), args=ocp.args.StandardSave(_checkpointed(state)), force=force)


def restore_state(
  manager: ocp.CheckpointManager, target: steps_lib.TrainState, step: int
) -> steps_lib.TrainState:
  """The state of checkpoint `step`, each array placed like `target`'s (any mesh).

  Raises:
    FileNotFoundError: if a process does not see the checkpoint (`_check_present`).
  """
  _check_present(manager.directory, step)
  restored = manager.restore(step, args=ocp.args.StandardRestore(_checkpointed(target)))
  return target.replace(**restored)


def _check_present(checkpoint_dir, step: int):
  """Raises FileNotFoundError on every process unless each one sees checkpoint `step`.

  Process 0 picks the step (`latest_step`); a host whose view of the workdir lacks it
  (not a shared filesystem, or a stale cache) would fail inside Orbax's restore while
  the others wait in its closing barrier. Checked and agreed before it
  (`sharding.failures_agreed`); Orbax's own errors inside the restore, where every
  process is in its collectives, are not (an agreement there would mismatch them).
  """
  with sharding.failures_agreed():
    if not os.path.isdir(os.path.join(checkpoint_dir, str(step))):
      raise FileNotFoundError(
        f'Checkpoint {step} of {checkpoint_dir} is missing on host {socket.gethostname()} '
        f'(process {jax.process_index()}): the workdir must be on a filesystem every host '
        'sees.'
      )


def _from_process_0(value: int) -> int:
  """Process 0's `value` on every process (a broadcast; as it is with one process)."""
  if jax.process_count() == 1:
    return value
  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def latest_step(manager: ocp.CheckpointManager) -> int | None:
  """The latest checkpoint's step as process 0 sees it, on every process; None if none.

  Each process listing the directory itself could see another set while a checkpoint
  is being finalised or pruned, and restore another step; all restore this one.
  """
  step = _from_process_0(-1 if (latest := manager.latest_step()) is None else latest)
  return None if step < 0 else step


def reached_preemption(manager: ocp.CheckpointManager, step: int) -> bool:
  """True on every process at the same step once any process got SIGTERM.

  JAX's preemption service (started by `jax.distributed.initialize`) catches
  SIGTERM in each process and agrees a sync step over all of them. In a
  single-process run there is no service and this is always False (main.py's own
  SIGTERM handler covers that case).
  """
  return manager.reached_preemption(step)


def _missing(checkpoint_dir: str) -> FileNotFoundError:
  return FileNotFoundError(
    f'No checkpoint in {checkpoint_dir}. Pass the --workdir of a training run, or '
    'train first: python -m alexnet_jax.main --config=CONFIG --workdir=DIR.'
  )


def restore_params(
  config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh, step: int | None = None
) -> tuple[dict[str, Any], int]:
  """(variables, step) of a checkpoint in `workdir/checkpoints`, without the optimizer.

  Only the parameters and a BN model's running averages are read (Orbax partial
  restore), as one dict of layers (`steps.model_variables`; the parameters alone
  without BN), placed on `mesh` by `sharding.PARTITION_RULES` whatever mesh wrote the
  checkpoint.

  Args:
    config: the run's config (it fixes the parameter shapes).
    workdir: a training run's workdir.
    mesh: where to place the params.
    step: the checkpoint's step; None for the latest.

  Raises:
    FileNotFoundError: if `workdir` has no checkpoint, or none at `step`, or a
      process does not see it (`_check_present`).
  """
  checkpoint_dir = directory(workdir)
  if not os.path.isdir(checkpoint_dir):  # CheckpointManager would create it.
    raise _missing(checkpoint_dir)
  params, batch_stats = steps_lib.abstract_variables(config, mesh)
  target = {'params': params, 'batch_stats': batch_stats} if batch_stats else {'params': params}
  with ocp.CheckpointManager(checkpoint_dir) as manager:
    saved = manager.all_steps()
    if step is None:
      step = latest_step(manager)
      if step is None:
        raise _missing(checkpoint_dir)
    elif not _from_process_0(step in saved):  # Every process raises, or none does.
      if not saved:
        raise _missing(checkpoint_dir)
      raise FileNotFoundError(
        f'No checkpoint of step {step} in {checkpoint_dir}; its steps are {sorted(saved)}.'
      )
    _check_present(checkpoint_dir, step)
    restored = manager.restore(
      step,
      args=ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True,
      ),
    )
  return steps_lib.model_variables(restored['params'], restored.get('batch_stats', {})), step


def save_params(workdir: str, params: dict[str, Any], step: int = 0):
  """Writes `params` as checkpoint `step` of `workdir` (e.g. imported weights), so that
  `restore_params`, `--mode=eval` and predict read it like a trained run's."""
  with create_manager(workdir) as manager:
    manager.save(step, args=ocp.args.StandardSave({'params': params}), force=True)
    manager.wait_until_finished()


def check_import_workdir(workdir: str):
  """Refuses to import into a `workdir` that holds anything (importers ask before
  reading their file).

  Raises:
    ValueError: if `workdir` exists and is not empty.
  """
  if os.path.exists(workdir) and os.listdir(workdir):
    raise ValueError(f'{workdir} is not empty: import into a new --workdir.')


def write_imported_workdir(
  workdir: str, params: dict[str, Any], config: ml_collections.ConfigDict
) -> str:
  """Writes imported weights as checkpoint 0 of a new `workdir`, with `config.json`, so
  that `--mode=eval`, predict, features, plots and `config.init_from` read it like a
  trained run's (parameters only: no optimizer state to resume training from).

  The workdir is written whole or not at all: built in a sibling temporary directory,
  then renamed, so a killed import leaves no config.json without its checkpoint.

  Returns:
    The workdir's absolute path.

  Raises:
    ValueError: if `workdir` exists and is not empty (`check_import_workdir`).
  """
  check_import_workdir(workdir)
  workdir = os.path.abspath(workdir)
  os.makedirs(os.path.dirname(workdir), exist_ok=True)
  partial = tempfile.mkdtemp(prefix=f'.{os.path.basename(workdir)}.', dir=os.path.dirname(workdir))
  try:
    save_params(partial, params)
    config_lib.save(config, partial)
    os.replace(partial, workdir)  # Atomic; replaces an empty directory.
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  return workdir


def has_checkpoint(workdir: str) -> bool:
  """Whether `workdir` holds a finished checkpoint (Orbax's temporary ones don't count)."""
  checkpoint_dir = directory(workdir)
  return os.path.isdir(checkpoint_dir) and any(n.isdigit() for n in os.listdir(checkpoint_dir))


def check_init_from(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config of the run `config.init_from` names, checked before any data is read.

  Raises:
    config_lib.ConfigError: naming `config.init_from` (or `init_from_step`) if the
      workdir, its config.json or the checkpoint is missing, or naming each key of
      `config_lib.FUNCTION_KEYS` but num_classes whose value differs from the source
      run's and is not in `config.init_from_allowed_changes`.
  """
  source_dir = config.init_from
  source = config_lib.load(source_dir) if os.path.isdir(source_dir) else None
  if source is None:
    raise config_lib.ConfigError(
      f'config.init_from={source_dir!r}: no training run there (no '
      f'{config_lib.CONFIG_FILE}); name the --workdir of a finished run or of an import '
      '(import_caffe, import_torchvision).'
    )
  steps = (
    sorted(int(n) for n in os.listdir(directory(source_dir)) if n.isdigit())
    if has_checkpoint(source_dir)
    else []
  )
  if not steps:
    raise config_lib.ConfigError(f'config.init_from={source_dir!r}: it has no checkpoint.')
  if config.init_from_step is not None and config.init_from_step not in steps:
    raise config_lib.ConfigError(
      f'config.init_from_step={config.init_from_step}: {source_dir} has checkpoints of '
      f'steps {steps}.'
    )
  changed = {
    key: values
    for key, values in config_lib.function_differences(source, config).items()
    if key != 'num_classes' and key not in config.init_from_allowed_changes
  }
  if changed:
    raise config_lib.ConfigError(
      f'config.init_from={source_dir!r} was trained with other values of '
      + '; '.join(f'{key} ({old!r} there, {new!r} here)' for key, (old, new) in changed.items())
      + ': its layers would compute another function here. Use its values, or name '
      f'the keys in --config.init_from_allowed_changes="{tuple(changed)!r}" to '
      'start from it anyway.'
    )
  return source


def init_from(
  config: ml_collections.ConfigDict, params: dict[str, Any], mesh: jax.sharding.Mesh
) -> tuple[dict[str, Any], int]:
  """(`params` (a new run's initial variables, `steps.model_variables`, on `mesh`) with
  the layers of the checkpoint `config.init_from` names copied in, by layer name (as
  Caffe's CopyTrainedLayersFrom), BN running averages with their layer; that
  checkpoint's step: `config.init_from_step`, or the source's latest when None).

  Layers matching a `config.reinit` pattern keep their initial values, as does fc8 when
  only the class count differs, and a layer the source lacks (a BN layer, when
  `model` changes by `init_from_allowed_changes`); every other layer is copied bit for
  bit. The copied and reinitialised layers are logged.

  Raises:
    config_lib.ConfigError: as `check_init_from`, or for a layer whose shapes differ
      otherwise, naming the layer and both shapes.
  """
  source_config = check_init_from(config)
  source, step = restore_params(source_config, config.init_from, mesh, config.init_from_step)
  result, copied, reinitialised = {}, [], []
  for layer, initial in params.items():
    other_classes = layer == 'fc8' and source_config.num_classes != config.num_classes
    reinit = any(re.fullmatch(pattern, layer) for pattern in config.reinit)
    if reinit or other_classes or layer not in source:
      result[layer] = initial
      reinitialised.append(layer)
      continue
    shapes = {kind: (source[layer][kind].shape, x.shape) for kind, x in initial.items()}
    for kind, (there, here) in shapes.items():
      if there != here:
        raise config_lib.ConfigError(
          f'config.init_from={config.init_from!r}: {layer}/{kind} is {there} there and '
          f'{here} here; list {layer!r} in config.reinit to start it from config.init.'
        )
    result[layer] = source[layer]
    copied.append(layer)
  logging.info(
    'Parameters from step %d of %s: copied %s; from config.init (%s): %s.',
    step,
    config.init_from,
    ', '.join(copied) or 'none',
    config.init,
    ', '.join(reinitialised) or 'none',
  )
  return result, step
