"""The training loop: resume, train, evaluate, checkpoint and log, on any mesh and any
number of processes; stops cleanly on preemption and never keeps a non-finite state.
"""

import contextlib
import dataclasses
import json
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from alexnet_jax import checkpoints
from alexnet_jax import config_lib
from alexnet_jax import evaluate
from alexnet_jax import files
from alexnet_jax import optimizers
from alexnet_jax import sharding
from alexnet_jax import steps as steps_lib

# Set by `request_stop` (main.py's SIGTERM handler in a single-process run: clusters
# send SIGTERM before they preempt a job); the loop then checkpoints the current step
# and raises `Preempted`. Several processes agree on the step through JAX's
# preemption service instead (`checkpoints.reached_preemption`).
_STOP = threading.Event()


class Preempted(Exception):
  """Training stopped early on request, after checkpointing; a rerun resumes."""


class PreemptedWaitingForData(Preempted):
  """`Preempted` with the thread reading batches still blocked inside tf.data (a stop
  while waiting for a batch, or one it did not leave tf.data for in
  `_STOP_JOIN_SECONDS`): an interpreter exit that tears it down aborts the process
  (C++'s "FATAL: exception not rethrown"). Checkpoints and TensorBoard events are
  complete when it is raised: leave with `os._exit`."""


def request_stop(*unused_signal_args):
  """Asks the running loop to checkpoint and stop after its current step."""
  _STOP.set()


# How long a stop waits for the read-ahead thread to leave tf.data (it checks for the
# stop every 0.5 s between batches) before the process leaves with `os._exit`: well
# inside SLURM's default KillWait of 30 s between SIGTERM and SIGKILL.
_STOP_JOIN_SECONDS = 5
# How long any other way out (the end, an error) waits for it: a batch still being
# read is finished rather than torn down (see PreemptedWaitingForData).
_JOIN_SECONDS = 30


class _ReadAhead:
  """Reads batches `size` ahead on a thread, started by `start`; the thread is stopped
  on leaving the context, after everything entered inside it has been closed.

  The loop then waits on a queue, not inside tf.data's C++ iterator, where a SIGTERM
  handler cannot run until a batch arrives: one that never does (a stalled file
  system) would make the job ignore SIGTERM. (Only a single-process run sets the
  stop from SIGTERM; several processes stop through JAX's preemption service, after
  a step.) Entered before the checkpoint manager and the metric writer, it is left
  after them: a stop saves the checkpoint and the last TensorBoard events first, and
  only then waits (`_STOP_JOIN_SECONDS`) for a thread that may be blocked for good.
  A stop that leaves the thread inside tf.data is raised as `PreemptedWaitingForData`.
  """

  def __init__(self, size: int = 2):
    self._batches = queue.Queue(size)
    self._done = threading.Event()
    self._thread = None

  def start(self, make_batches) -> Callable[[], Any]:
    """Starts reading `make_batches()`; returns `next_batch()`: the next batch, or None
    if a stop is requested (`request_stop`) while waiting for one. Errors of the
    pipeline are raised by `next_batch`."""

    def put(item) -> bool:
      while not self._done.is_set():
        try:
          self._batches.put(item, timeout=0.5)
          return True
        except queue.Full:
          pass
      return False

    def read():
      try:
        for batch in make_batches():
          if not put((batch, None)):
            return
      except Exception as e:  # pylint: disable=broad-except
        put((None, e))  # Raised in the loop's thread.

    def next_batch():
      while True:
        try:
          batch, error = self._batches.get(timeout=0.5)
        except queue.Empty:
          if _STOP.is_set():
            return None
          continue
        if error is not None:
          raise error
        return batch

    self._thread = threading.Thread(target=read, name='read_ahead', daemon=True)
    self._thread.start()
    return next_batch

  def __enter__(self):
    return self

  def __exit__(self, unused_type, error, unused_traceback):
    self._done.set()
    if self._thread is None:
      return
    if isinstance(error, PreemptedWaitingForData):
      return  # Blocked inside tf.data: the process leaves with os._exit.
    stopping = isinstance(error, Preempted)
    self._thread.join(timeout=_STOP_JOIN_SECONDS if stopping else _JOIN_SECONDS)
    if stopping and self._thread.is_alive():
      raise PreemptedWaitingForData(str(error)) from error


def _save(manager, state, step: int, unchecked, config, checkpoint_dir: str):
  """Checkpoints `state` (of `step`) unless it holds NaNs: neither a step's loss and
  gradients (the `unchecked` window's) nor the parameters it left.

  Raises:
    FloatingPointError: for non-finite values (`_nonfinite_error`).
  """
  _check_finite(unchecked, config, checkpoint_dir)
  if not steps_lib.all_finite((state.params, state.batch_stats)):
    raise _nonfinite_error(
      step,
      'finite loss and gradients, but NaN or Inf parameters after the update',
      config,
      checkpoint_dir,
    )
  checkpoints.save(manager, state, force=True)


def itstime(step: int, every: int, total: int) -> bool:
  """Whether a periodic action (every `every` steps, and at the last) runs at `step`."""
  return step % every == 0 or step == total


class Chrono:
  """Training throughput, timed between log points.

  The first window after (re)starting holds the compilation and is left out of the
  run's average; time inside `paused()` (evaluation) is left out of every window.
  """

  def __init__(self, images_per_step: int):
    self.images_per_step = images_per_step
    self.train_seconds = 0.0
    self.train_images = 0
    self._first = True
    self._mark = time.perf_counter()

  def window(self, num_steps: int) -> float:
    """img/s of the `num_steps` steps since the last window; call after their results
    are on the host, so the time is the steps' own."""
    now = time.perf_counter()
    elapsed, self._mark = now - self._mark, now
    images = num_steps * self.images_per_step
    if not self._first:
      self.train_seconds += elapsed
      self.train_images += images
    self._first = False
    return images / elapsed

  @contextlib.contextmanager
  def paused(self):
    """Leaves the time spent inside (evaluation, checkpoints) out of the throughput."""
    start = time.perf_counter()
    try:
      yield
    finally:
      self._mark += time.perf_counter() - start

  @property
  def images_per_sec(self) -> float | None:
    """Over the whole run, compilation and evaluation excluded; None before 2 windows."""
    return self.train_images / self.train_seconds if self.train_seconds else None


def _step_of(line: str) -> int | None:
  """The step of a metrics.jsonl line; None for a line cut short."""
  try:
    return json.loads(line)['step']
  except (json.JSONDecodeError, KeyError, TypeError):
    return None


class _MetricsLog:
  """The workdir's `metrics.jsonl`: one JSON object per logged step (process 0 only)."""

  def __init__(self, path: str, resume_step: int):
    self.path = path
    if jax.process_index() > 0:
      return
    # A resumed run logs again what came after its checkpoint: drop the old lines, and
    # a last line torn by a kill. Replaced whole, so that a kill while rewriting it
    # leaves the old file, never a truncated history.
    if os.path.exists(path):
      with open(path) as f:
        kept = [line for line in f if (step := _step_of(line)) is not None and step <= resume_step]
      # A complete last line may lack its newline (a kill just before it).
      files.write_text(path, ''.join(line.rstrip('\n') + '\n' for line in kept))

  def write(self, step: int, metrics: dict[str, float]):
    if jax.process_index() == 0:
      with open(self.path, 'a') as f:
        f.write(json.dumps({'step': step, **metrics}) + '\n')


def _nonfinite_error(
  step: int, what: str, config: ml_collections.ConfigDict, checkpoint_dir: str
) -> FloatingPointError:
  rate = f'config.learning_rate={config.learning_rate}'
  if config.lr_reference_batch is not None:  # The rate the step used, scaled to the batch.
    rate += (
      f' x batch_size {config.batch_size} / lr_reference_batch {config.lr_reference_batch}'
      f' = {optimizers.base_learning_rate(config):g}'
    )
  causes = [f'a learning rate too high for this run ({rate}; try a smaller one)']
  if config.dtype == 'float16':
    causes.append("float16's narrow range (use config.dtype='bfloat16')")
  if config.dropout_rate >= 0.9:
    causes.append(
      f'config.dropout_rate={config.dropout_rate} (kept units are scaled by '
      '1 / (1 - rate); 1 drops every unit)'
    )
  causes.append('bad input data (check the dataset and config.pixel_std)')
  return FloatingPointError(
    f'Step {step} is not finite ({what}); the run stops without keeping it. Likely '
    f'cause: {"; or ".join(causes)}. A rerun resumes from the last checkpoint in '
    f'{checkpoint_dir}, which is finite.'
  )


def _check_finite(window: list[tuple[int, dict]], config, checkpoint_dir: str):
  """Raises for the first step of `window` whose loss or gradients hold a NaN or Inf."""
  for step, metrics in jax.device_get(window):
    if not metrics['finite']:
      what = (
        f'train loss {metrics["loss"]}'
        if not np.isfinite(metrics['loss'])
        else f'train loss {metrics["loss"]:.4f}, but NaN or Inf gradients'
      )
      raise _nonfinite_error(step, what, config, checkpoint_dir)


def _record_config(config, workdir: str, changes: dict, step: int):
  """Process 0 keeps the run's config in `workdir/config.json`; an allowed change to
  it is appended to `config_changes.jsonl` with the step it applies from."""
  if jax.process_index() > 0:
    return
  if changes:
    with open(os.path.join(workdir, 'config_changes.jsonl'), 'a') as f:
      f.write(json.dumps({'from_step': step, 'changes': changes}, default=repr) + '\n')
  config_lib.save(config, workdir)


def _with_init_from_step(config, step: int | None) -> ml_collections.ConfigDict:
  """`config` (unchanged, or a copy) with `init_from_step` = `step` if that is known."""
  if step is None or config.init_from_step == step:
    return config
  config = config.copy_and_resolve_references()
  config.init_from_step = step
  return config


def _recorded_init_from_step(config, workdir: str) -> int | None:
  """The source step recorded in `workdir/config.json` by a run started from
  `config.init_from` whose `init_from_step` was left at None (the source's latest
  then); None if there is none, or `config` names a step itself."""
  saved = config_lib.load(workdir)
  if config.init_from_step is not None or saved is None:
    return None
  return saved.init_from_step


def _checked_config(
  config: ml_collections.ConfigDict, workdir: str, allow_change: bool
) -> tuple[ml_collections.ConfigDict, dict]:
  """(The run's config, its allowed changes) once a rerun's config and a new run's
  `init_from` source are checked, before any data is read (see train_and_evaluate)."""
  config = _with_init_from_step(config, _recorded_init_from_step(config, workdir))
  changes = config_lib.check_rerun(config, workdir, allow_change=allow_change)
  if config.init_from and not checkpoints.has_checkpoint(workdir):
    checkpoints.check_init_from(config)  # A missing source says so before any data.
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
  return config, changes


@dataclasses.dataclass(frozen=True)
class _Setup:
  """What every process builds before any checkpoint is read."""

  mesh: jax.sharding.Mesh
  data: Any  # input_pipeline.Datasets.
  every: dict[str, int]  # 'total', 'log_every', 'eval_every', 'checkpoint_every': steps.
  schedule: Callable[[int], Any]  # Step -> learning rate.
  tx: Any  # The optax optimizer.
  dropout_rng: jax.Array
  train_graphdef: Any
  eval_graphdef: Any


def _setup(config: ml_collections.ConfigDict) -> tuple[_Setup, steps_lib.TrainState]:
  """(The mesh, this process's part of the data, the step counts, the schedule; the
  initial state on the mesh); logs the batch per process and device and the
  parameter placement."""
  # Imported here, as clu: both import TensorFlow, which the steps do not need.
  from alexnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top

  mesh = sharding.create_mesh(config.mesh)
  part, num_parts = sharding.data_groups(mesh)
  data = input_pipeline.create_datasets(config, part, num_parts)
  every = {
    name: config_lib.steps(config, name, data.steps_per_epoch)
    for name in ('total', 'log_every', 'eval_every', 'checkpoint_every')
  }
  logging.info(
    'Batch: global %d, per process %d (%d part(s) of the data), per device %d; '
    '%d steps per epoch, %d steps; mesh %s over %d process(es).',
    config.batch_size,
    config.batch_size // num_parts,
    num_parts,
    config.batch_size // mesh.shape['data'],
    data.steps_per_epoch,
    every['total'],
    dict(mesh.shape),
    jax.process_count(),
  )
  schedule = optimizers.create_learning_rate_schedule(config, data.steps_per_epoch, every['total'])
  tx = optimizers.create_optimizer(config, schedule)
  params_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
  train_graphdef, eval_graphdef = steps_lib.graphdefs(config)
  state = steps_lib.create_train_state(config, tx, params_rng, mesh)
  logging.info('Parameter placement:\n%s', sharding.describe_partitioning(state.params))
  setup = _Setup(mesh, data, every, schedule, tx, dropout_rng, train_graphdef, eval_graphdef)
  return setup, state


def _restore(
  config: ml_collections.ConfigDict, workdir: str, setup: _Setup, manager, changes: dict, state
) -> tuple[steps_lib.TrainState, ml_collections.ConfigDict]:
  """(The state to continue from, the run's config), the config recorded in
  `config.json`: the workdir's latest checkpoint, else the initial `state`, with the
  layers of `config.init_from` for a new run started from another (its source step
  recorded as `init_from_step`; momentum starts at 0)."""
  latest = checkpoints.latest_step(manager)
  if latest is not None:
    state = checkpoints.restore_state(manager, state, latest)
    logging.info('Resumed from step %d in %s.', int(state.step), checkpoints.directory(workdir))
  elif config.init_from:
    variables, source_step = checkpoints.init_from(
      config, steps_lib.model_variables(state.params, state.batch_stats), setup.mesh
    )
    params, batch_stats = steps_lib.split_variables(variables, state.batch_stats)
    state = state.replace(params=params, batch_stats=batch_stats)
    config = _with_init_from_step(config, source_step)
  _record_config(config, workdir, changes, int(state.step))
  return state, config


class _Loop:
  """The steps from a restored state to the last: train, log, evaluate, checkpoint, and
  stop on request. Holds the window of steps since the last log; process 0 writes."""

  def __init__(self, config, workdir: str, setup: _Setup, manager, writer, state):
    from clu import periodic_actions  # pylint: disable=g-import-not-at-top

    self.config, self.setup, self.manager, self.writer = config, setup, manager, writer
    self.state = state
    self.initial_step = int(state.step)
    self.num_steps = setup.every['total']
    self.steps_per_epoch = setup.data.steps_per_epoch
    self.checkpoint_dir = checkpoints.directory(workdir)
    normalization = (config.pixel_mean, config.pixel_std)
    mesh = setup.mesh
    self.train_step = steps_lib.jit_train_step(
      mesh, setup.train_graphdef, state, setup.tx, normalization, config.grad_accum_steps
    )
    self.eval_step = steps_lib.jit_eval_step(
      mesh, setup.eval_graphdef, self.variables(), normalization
    )
    self.metrics_log = _MetricsLog(os.path.join(workdir, 'metrics.jsonl'), self.initial_step)
    self.report_progress = periodic_actions.ReportProgress(
      num_train_steps=self.num_steps, writer=writer, every_steps=setup.every['log_every']
    )
    self.chrono = Chrono(config.batch_size)
    self.window, self.checked = [], 0  # (step, metrics) since the last log; how many checked.
    self.test = None  # The last evaluation's.
    if self.initial_step == 0:
      writer.write_hparams(config_lib.flatten(config))

  def variables(self):
    """The model's variables in eval mode: the parameters and any BN running averages."""
    return steps_lib.model_variables(self.state.params, self.state.batch_stats)

  def test_batches(self, crops: int):
    return (
      sharding.global_batch(self.setup.mesh, b) for b in self.setup.data.test_batches(crops=crops)
    )

  def run(self, reader: _ReadAhead):
    """Trains from the restored step to the last; a finished run reads no train data.

    Raises:
      FloatingPointError, Preempted: see train_and_evaluate.
    """
    if self.initial_step < self.num_steps:
      next_batch = reader.start(lambda: self.setup.data.train_batches(start_step=self.initial_step))
    for step in range(self.initial_step + 1, self.num_steps + 1):
      batch = next_batch()
      if batch is None:
        self._stop_waiting_for_data(step)
      self.state, metrics = self.train_step(
        self.state, sharding.global_batch(self.setup.mesh, batch), self.setup.dropout_rng
      )
      self.window.append((step, metrics))
      self.report_progress(step)
      if itstime(step, self.setup.every['log_every'], self.num_steps):
        self._log(step)
      if itstime(step, self.setup.every['eval_every'], self.num_steps):
        self._evaluate(step)
      self._checkpoint(step)
    self.manager.wait_until_finished()  # The last checkpoint is complete before results.

  def _check_unchecked(self):
    """Raises for a non-finite step of the window not checked yet; all are then."""
    _check_finite(self.window[self.checked :], self.config, self.checkpoint_dir)
    self.checked = len(self.window)

  def _log(self, step: int):
    """The window's mean train metrics, throughput and rate to TensorBoard and metrics.jsonl."""
    self._check_unchecked()
    rows = jax.device_get([m for _, m in self.window])
    summary = {f'train_{k}': float(np.mean([r[k] for r in rows])) for k in ('loss', 'top1', 'top5')}
    summary['train_images_per_sec'] = self.chrono.window(len(self.window))
    summary['learning_rate'] = float(self.setup.schedule(step - 1))
    summary['epoch'] = step / self.steps_per_epoch
    self.writer.write_scalars(step, summary)
    self.metrics_log.write(step, summary)
    self.window, self.checked = [], 0

  def _evaluate(self, step: int):
    """Evaluates the state of `step` on the test split; logged, kept as `self.test`."""
    self._check_unchecked()
    jax.block_until_ready(self.state)  # Train steps still in flight count as training.
    # Along the way the central patch, as Caffe's test phase; the last evaluation
    # (results.json) is config.eval_crops' test.
    crops = self.config.eval_crops if step == self.num_steps else 1
    with self.chrono.paused(), self.report_progress.timed('eval'):
      self.test = evaluate.evaluate(self.eval_step, self.variables(), self.test_batches(crops))
    test_metrics = {f'test_{k}': v for k, v in self.test.items() if k != 'count'}
    test_metrics['test_crops'] = crops
    self.writer.write_scalars(step, test_metrics)
    self.metrics_log.write(step, {'epoch': step / self.steps_per_epoch, **test_metrics})
    logging.info(
      'step %d epoch %.2f: test top-1 %.4f top-5 %.4f loss %.4f (%d crop(s))',
      step,
      step / self.steps_per_epoch,
      self.test['top1'],
      self.test['top5'],
      self.test['loss'],
      crops,
    )

  def _save(self, step: int):
    """Checkpoints the state as `step`, the window's unchecked steps checked (`_save`)."""
    _save(
      self.manager, self.state, step, self.window[self.checked :], self.config, self.checkpoint_dir
    )
    self.checked = len(self.window)

  def _checkpoint(self, step: int):
    """Saves `step` when it is time, at the last step and on a stop request.

    Raises:
      Preempted: on a stop request (before the last step), once it is saved.
    """
    stop = checkpoints.reached_preemption(self.manager, step) or _STOP.is_set()
    stop = stop and step < self.num_steps
    if self.manager.should_save(step) or stop or step == self.num_steps:
      self._save(step)
    if stop:
      self.manager.wait_until_finished()
      raise Preempted(
        f'Stopped on request (SIGTERM) after step {step}, checkpointed in '
        f'{self.checkpoint_dir}; rerun the same command to resume.'
      )

  def _stop_waiting_for_data(self, step: int):
    """Checkpoints the last step trained (its state stays) and raises
    PreemptedWaitingForData: a stop was requested while waiting for `step`'s batch."""
    last = step - 1
    if last > self.initial_step and self.manager.latest_step() != last:
      self._save(last)
    self.manager.wait_until_finished()
    done = (
      f'steps up to {last} are checkpointed in {self.checkpoint_dir}'
      if step > 1
      else 'no step was trained'
    )
    raise PreemptedWaitingForData(
      f'Stopped on request (SIGTERM) while waiting for the batch of step {step}; '
      f'{done}; rerun the same command to resume.'
    )

  def final_test(self) -> dict[str, float]:
    """The last evaluation, or (nothing was left to train) one of the restored state;
    refused if not finite.

    Raises:
      FloatingPointError: for a non-finite test loss or accuracy.
    """
    if self.test is None:
      self.test = evaluate.evaluate(
        self.eval_step, self.variables(), self.test_batches(self.config.eval_crops)
      )
    if not all(np.isfinite(self.test[k]) for k in ('loss', 'top1', 'top5')):
      raise FloatingPointError(
        f'The test loss of step {int(self.state.step)} is {self.test["loss"]} although '
        f'training was finite; results.json is not written. Check config.dtype='
        f'{self.config.dtype!r} (float16 overflows) and the test data.'
      )
    return self.test


def _results(loop: _Loop, start_time: float) -> dict[str, Any]:
  """The contents of results.json (see README) once `loop` has run."""
  step = int(loop.state.step)
  test = loop.final_test()
  return {
    'step': step,
    'epoch': step / loop.steps_per_epoch,
    'test_top1': test['top1'],
    'test_top5': test['top5'],
    'test_loss': test['loss'],
    'n_test_examples': test['count'],
    'train_images_per_sec': loop.chrono.images_per_sec,
    'wall_seconds': time.time() - start_time,
  }


def _write_results(workdir: str, results: dict[str, Any]):
  """Process 0 writes `results` to `workdir/results.json`, whole or not at all (sweeps
  look for it). A finished run evaluated again (no throughput measured) keeps what only
  its training measured."""
  if jax.process_index() > 0:
    return
  path = os.path.join(workdir, 'results.json')
  if results['train_images_per_sec'] is None and os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    results.update({k: previous[k] for k in ('train_images_per_sec', 'wall_seconds')})
  files.write_json(path, results)


@checkpoints.one_trainer_per_workdir
def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False
) -> dict[str, Any]:
  """Trains, evaluates and checkpoints in `workdir`; resumes from its latest checkpoint.

  Every process runs it; process 0 writes `config.json`, `metrics.jsonl`,
  TensorBoard events and, at the end, `results.json` (see README). Returns the
  contents of `results.json`.

  Raises:
    config_lib.ConfigError: if `workdir` holds a run with another config (see
      `config_lib.check_rerun`), or `config.init_from` cannot be used
      (`checkpoints.check_init_from`, `checkpoints.init_from`).
    FloatingPointError: at the first step whose loss or gradients are not finite, or
      before saving parameters that are not; nothing from it is saved.
    Preempted: after `request_stop` or a SIGTERM to any process, once the current
      step is checkpointed.
    checkpoints.WorkdirInUse: at once, if another trainer runs in `workdir`.
  """
  # Imported here: clu imports TensorFlow, which the steps do not need.
  from clu import metric_writers  # pylint: disable=g-import-not-at-top

  start_time = time.time()
  workdir = os.path.abspath(workdir)
  config, changes = _checked_config(config, workdir, allow_config_change)
  setup, state = _setup(config)
  # All closed on every way out (a NaN, a preemption, an error): no checkpoint thread
  # is left running, and the last TensorBoard events are written, before the wait for
  # the read-ahead thread (`_ReadAhead`).
  with (
    _ReadAhead() as reader,
    checkpoints.create_manager(
      workdir,
      save_interval_steps=setup.every['checkpoint_every'],
      max_to_keep=config.keep_checkpoints,
    ) as manager,
    contextlib.closing(
      metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    ) as writer,
  ):
    state, config = _restore(config, workdir, setup, manager, changes, state)
    loop = _Loop(config, workdir, setup, manager, writer, state)
    loop.run(reader)
    results = _results(loop, start_time)
  _write_results(workdir, results)
  return results
