"""The training loop: resume, train, evaluate, checkpoint and log, on any mesh and any
number of processes; stops cleanly on preemption and never keeps a non-finite state.
"""

import contextlib
import json
import os
import queue
import threading
import time
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
  """`Preempted` while waiting for a batch: the thread reading it may still be blocked
  inside tf.data, and an interpreter exit that tears it down aborts the process
  (C++'s "FATAL: exception not rethrown"): leave with `os._exit`."""


def request_stop(*unused_signal_args):
  """Asks the running loop to checkpoint and stop after its current step."""
  _STOP.set()


@contextlib.contextmanager
def _read_ahead(make_batches, size: int = 2):
  """Yields `next_batch()`: the batches of `make_batches()`, read `size` ahead on a
  thread; None if a stop is requested (`request_stop`) while waiting for one.

  The loop then waits on a queue, not inside tf.data's C++ iterator, where a SIGTERM
  handler cannot run until a batch arrives: one that never does (a stalled file
  system) would make the job ignore SIGTERM. (Only a single-process run sets the
  stop from SIGTERM; several processes stop through JAX's preemption service, after
  a step.) Errors of the pipeline are raised by
  `next_batch`; leaving the context stops the thread after its current batch.
  """
  batches, done = queue.Queue(size), threading.Event()

  def put(item) -> bool:
    while not done.is_set():
      try:
        batches.put(item, timeout=0.5)
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
        batch, error = batches.get(timeout=0.5)
      except queue.Empty:
        if _STOP.is_set():
          return None
        continue
      if error is not None:
        raise error
      return batch

  thread = threading.Thread(target=read, name='read_ahead', daemon=True)
  thread.start()
  try:
    yield next_batch
  finally:
    done.set()
    # Out of tf.data before the interpreter exits (see PreemptedWaitingForData); a
    # thread still blocked reading is left to the caller.
    thread.join(timeout=30)


def _save(manager, state, step: int, unchecked, config, checkpoint_dir: str):
  """Checkpoints `state` (of `step`) unless it holds NaNs: neither a step's loss and
  gradients (the `unchecked` window's) nor the parameters it left.

  Raises:
    FloatingPointError: for non-finite values (`_nonfinite_error`).
  """
  _check_finite(unchecked, config, checkpoint_dir)
  if not steps_lib.all_finite(state.params):
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
  causes = [
    f'a learning rate too high for this run (config.learning_rate='
    f'{config.learning_rate}; try a smaller one)'
  ]
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
  """
  # Imported here: both import TensorFlow, which the steps do not need.
  from clu import metric_writers, periodic_actions  # pylint: disable=g-import-not-at-top
  from alexnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top

  start_time = time.time()
  workdir = os.path.abspath(workdir)
  changes = config_lib.check_rerun(config, workdir, allow_change=allow_config_change)
  if config.init_from and not checkpoints.has_checkpoint(workdir):
    checkpoints.check_init_from(config)  # A missing source says so before any data.
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
  mesh = sharding.create_mesh(config.mesh)
  part, num_parts = sharding.data_groups(mesh)
  data = input_pipeline.create_datasets(config, part, num_parts)
  steps_per_epoch = data.steps_per_epoch
  every = {
    name: config_lib.steps(config, name, steps_per_epoch)
    for name in ('total', 'log_every', 'eval_every', 'checkpoint_every')
  }
  num_steps = every['total']
  logging.info(
    'Batch: global %d, per process %d (%d part(s) of the data), per device %d; '
    '%d steps per epoch, %d steps; mesh %s over %d process(es).',
    config.batch_size,
    config.batch_size // num_parts,
    num_parts,
    config.batch_size // mesh.shape['data'],
    steps_per_epoch,
    num_steps,
    dict(mesh.shape),
    jax.process_count(),
  )

  schedule = optimizers.create_learning_rate_schedule(config, steps_per_epoch, num_steps)
  tx = optimizers.create_optimizer(config, schedule)
  params_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
  train_graphdef, eval_graphdef = steps_lib.graphdefs(config)
  state = steps_lib.create_train_state(config, tx, params_rng, mesh)
  logging.info('Parameter placement:\n%s', sharding.describe_partitioning(state.params))

  checkpoint_dir = checkpoints.directory(workdir)
  # Both closed on every way out (a NaN, a preemption, an error): no checkpoint thread
  # is left running, and the last TensorBoard events are written.
  with (
    checkpoints.create_manager(
      workdir, save_interval_steps=every['checkpoint_every'], max_to_keep=config.keep_checkpoints
    ) as manager,
    contextlib.closing(
      metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    ) as writer,
    contextlib.ExitStack() as stack,
  ):
    latest = checkpoints.latest_step(manager)
    if latest is not None:
      state = checkpoints.restore_state(manager, state, latest)
      logging.info('Resumed from step %d in %s.', int(state.step), checkpoint_dir)
    elif config.init_from:  # Only a new run starts from another; momentum starts at 0.
      state = state.replace(params=checkpoints.init_from(config, state.params, mesh))
    initial_step = int(state.step)
    _record_config(config, workdir, changes, initial_step)

    normalization = (config.pixel_mean, config.pixel_std)
    train_step = steps_lib.jit_train_step(
      mesh, train_graphdef, state, tx, normalization, config.grad_accum_steps
    )
    eval_step = steps_lib.jit_eval_step(mesh, eval_graphdef, state.params, normalization)
    test_batches = lambda crops: (
      sharding.global_batch(mesh, b) for b in data.test_batches(crops=crops)
    )
    metrics_log = _MetricsLog(os.path.join(workdir, 'metrics.jsonl'), initial_step)
    report_progress = periodic_actions.ReportProgress(
      num_train_steps=num_steps, writer=writer, every_steps=every['log_every']
    )
    if initial_step == 0:
      writer.write_hparams(config_lib.flatten(config))

    if initial_step < num_steps:  # A finished run evaluated again reads no train data.
      next_batch = stack.enter_context(
        _read_ahead(lambda: data.train_batches(start_step=initial_step))
      )
    chrono = Chrono(config.batch_size)
    window, checked = [], 0  # (step, metrics) since the last log; how many are checked.
    test = None
    for step in range(initial_step + 1, num_steps + 1):
      batch = next_batch()
      if batch is None:  # Stopped while waiting for data: the last step's state stays.
        if step - 1 > initial_step and manager.latest_step() != step - 1:
          _save(manager, state, step - 1, window[checked:], config, checkpoint_dir)
        manager.wait_until_finished()
        done = (
          f'steps up to {step - 1} are checkpointed in {checkpoint_dir}'
          if step > 1
          else 'no step was trained'
        )
        raise PreemptedWaitingForData(
          f'Stopped on request (SIGTERM) while waiting for the batch of step {step}; '
          f'{done}; rerun the same command to resume.'
        )
      state, step_metrics = train_step(state, sharding.global_batch(mesh, batch), dropout_rng)
      window.append((step, step_metrics))
      report_progress(step)
      if itstime(step, every['log_every'], num_steps):
        _check_finite(window[checked:], config, checkpoint_dir)
        rows = jax.device_get([m for _, m in window])
        summary = {
          f'train_{k}': float(np.mean([r[k] for r in rows])) for k in ('loss', 'top1', 'top5')
        }
        summary['train_images_per_sec'] = chrono.window(len(window))
        summary['learning_rate'] = float(schedule(step - 1))
        summary['epoch'] = step / steps_per_epoch
        writer.write_scalars(step, summary)
        metrics_log.write(step, summary)
        window, checked = [], 0
      if itstime(step, every['eval_every'], num_steps):
        _check_finite(window[checked:], config, checkpoint_dir)
        checked = len(window)
        jax.block_until_ready(state)  # Train steps still in flight count as training.
        # Along the way the central patch, as Caffe's test phase; the last evaluation
        # (results.json) is config.eval_crops' test.
        crops = config.eval_crops if step == num_steps else 1
        with chrono.paused(), report_progress.timed('eval'):
          test = evaluate.evaluate(eval_step, state.params, test_batches(crops))
        test_metrics = {f'test_{k}': v for k, v in test.items() if k != 'count'}
        test_metrics['test_crops'] = crops
        writer.write_scalars(step, test_metrics)
        metrics_log.write(step, {'epoch': step / steps_per_epoch, **test_metrics})
        logging.info(
          'step %d epoch %.2f: test top-1 %.4f top-5 %.4f loss %.4f (%d crop(s))',
          step,
          step / steps_per_epoch,
          test['top1'],
          test['top5'],
          test['loss'],
          crops,
        )
      preempted = (checkpoints.reached_preemption(manager, step) or _STOP.is_set()) and (
        step < num_steps
      )
      if manager.should_save(step) or preempted or step == num_steps:
        _save(manager, state, step, window[checked:], config, checkpoint_dir)
        checked = len(window)
      if preempted:
        manager.wait_until_finished()
        raise Preempted(
          f'Stopped on request (SIGTERM) after step {step}, checkpointed in '
          f'{checkpoint_dir}; rerun the same command to resume.'
        )
    manager.wait_until_finished()  # The last checkpoint is complete before results.json.

    if test is None:  # Nothing left to train: evaluate what was restored.
      test = evaluate.evaluate(eval_step, state.params, test_batches(config.eval_crops))
    if not all(np.isfinite(test[k]) for k in ('loss', 'top1', 'top5')):
      raise FloatingPointError(
        f'The test loss of step {int(state.step)} is {test["loss"]} although training '
        f'was finite; results.json is not written. Check config.dtype={config.dtype!r} '
        '(float16 overflows) and the test data.'
      )
    results = {
      'step': int(state.step),
      'epoch': int(state.step) / steps_per_epoch,
      'test_top1': test['top1'],
      'test_top5': test['top5'],
      'test_loss': test['loss'],
      'n_test_examples': test['count'],
      'train_images_per_sec': chrono.images_per_sec,
      'wall_seconds': time.time() - start_time,
    }
  if jax.process_index() == 0:
    path = os.path.join(workdir, 'results.json')
    if chrono.images_per_sec is None and os.path.exists(path):
      # A finished run, evaluated again: keep what only its training measured.
      with open(path) as f:
        previous = json.load(f)
      results.update({k: previous[k] for k in ('train_images_per_sec', 'wall_seconds')})
    files.write_json(path, results)  # Whole or not at all: sweeps look for it.
  return results
