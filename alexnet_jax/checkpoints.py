"""Orbax checkpoints of the train state: saved sharded by every process, restored onto
any mesh, the parameters alone without an optimizer; preemption across processes.
"""

import os
from typing import Any

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from alexnet_jax import steps as steps_lib


def directory(workdir: str) -> str:
  """Where the run in `workdir` keeps its checkpoints: `<workdir>/checkpoints/<step>/`."""
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


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


def save(manager: ocp.CheckpointManager, state: steps_lib.TrainState, *, force: bool = False):
  """Starts an asynchronous save of `state` at its step (every process calls it)."""
  manager.save(int(state.step), args=ocp.args.StandardSave(state), force=force)


def restore_state(
  manager: ocp.CheckpointManager, target: steps_lib.TrainState, step: int
) -> steps_lib.TrainState:
  """The state of checkpoint `step`, each array placed like `target`'s (any mesh)."""
  return manager.restore(step, args=ocp.args.StandardRestore(target))


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
  """(params, step) of a checkpoint in `workdir/checkpoints`, without the optimizer.

  Only the parameters are read (Orbax partial restore), placed on `mesh` by
  `sharding.PARTITION_RULES` whatever mesh wrote the checkpoint.

  Args:
    config: the run's config (it fixes the parameter shapes).
    workdir: a training run's workdir.
    mesh: where to place the params.
    step: the checkpoint's step; None for the latest.

  Raises:
    FileNotFoundError: if `workdir` has no checkpoint, or none at `step`.
  """
  checkpoint_dir = directory(workdir)
  if not os.path.isdir(checkpoint_dir):  # CheckpointManager would create it.
    raise _missing(checkpoint_dir)
  target = {'params': steps_lib.abstract_params(config, mesh)}
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
    restored = manager.restore(
      step,
      args=ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True,
      ),
    )
  return restored['params'], step


def save_params(workdir: str, params: dict[str, Any], step: int = 0):
  """Writes `params` as checkpoint `step` of `workdir` (e.g. imported weights), so that
  `restore_params`, `--mode=eval` and predict read it like a trained run's."""
  with create_manager(workdir) as manager:
    manager.save(step, args=ocp.args.StandardSave({'params': params}), force=True)
    manager.wait_until_finished()
