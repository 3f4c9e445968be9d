"""Training loop: state, jitted `train_step` / `eval_step`, checkpoints, metrics.

Importing this module needs no TensorFlow (the input pipeline and clu's writers are
imported inside `train_and_evaluate`), so the steps run where only JAX is installed.
"""

import functools
import json
import os
import threading
import time
from typing import Any

from absl import logging
import flax
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from alexnet_jax import models
from alexnet_jax import sharding

Batch = dict[str, jax.Array]

# Set by `request_stop` (main.py's SIGTERM handler: clusters send SIGTERM before they
# preempt a job); the loop then checkpoints the current step and raises `Preempted`.
_STOP = threading.Event()


class Preempted(Exception):
  """Training stopped early on request, after checkpointing; a rerun resumes."""


def request_stop(*unused_signal_args):
  """Asks the running loop to checkpoint and stop after its current step."""
  _STOP.set()


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint holds; data order and dropout keys derive from `step`.

  `params` is a plain dict, e.g. params['conv2']['kernel'] of shape (5, 5, 48, 256).
  """
  step: jax.Array
  params: dict[str, Any]
  opt_state: optax.OptState


def create_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> models.AlexNet:
  return models.AlexNet(
      config.num_classes, image_size=config.image_size,
      dropout_rate=config.dropout_rate, init=config.init, lrn=config.lrn,
      dtype=jnp.dtype(config.dtype), rngs=rngs)


def create_learning_rate_schedule(
    config: ml_collections.ConfigDict, steps_per_epoch: int, num_steps: int
) -> optax.Schedule:
  """Learning rate per step, from `config.lr_schedule`.

  'step' is the paper's (Sec. 5): the rate divided by 10 at fixed epochs
  (`config.lr_decay_epochs`), standing in for "when the validation error rate
  stopped improving". 'cosine' warms up linearly for `config.warmup_steps`, then
  decays to 0 at `num_steps`. 'constant' is the base rate throughout.

  Raises:
    ValueError: for an unknown schedule name.
  """
  base = config.learning_rate
  if config.lr_schedule == 'constant':
    return optax.constant_schedule(base)
  if config.lr_schedule == 'step':
    return optax.piecewise_constant_schedule(
        base, {int(e * steps_per_epoch): config.lr_decay_factor
               for e in config.lr_decay_epochs})
  if config.lr_schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        0.0, base, config.warmup_steps, max(num_steps, config.warmup_steps + 1))
  raise ValueError(f"Unknown lr_schedule {config.lr_schedule!r}: "
                   "use 'step', 'cosine' or 'constant'.")


def create_optimizer(config: ml_collections.ConfigDict,
                     schedule: optax.Schedule) -> optax.GradientTransformation:
  """SGD with momentum and weight decay, coupled as in the paper's update (Sec. 5).

  v <- momentum * v - lr * (grad + weight_decay * w);  w <- w + v. The decay
  applies to every parameter, biases included, as the paper's rule does.
  """
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(schedule, momentum=config.momentum))


def create_train_state(config, tx, rng: jax.Array, mesh: jax.sharding.Mesh
                       ) -> tuple[nnx.GraphDef, nnx.GraphDef, TrainState]:
  """Initial state, created directly with its shardings on `mesh`.

  The initial values do not depend on the mesh (JAX's random bits are
  sharding-invariant), so runs on different meshes start from the same weights.

  Returns:
    (train_graphdef, eval_graphdef, state); the graphdefs differ only in dropout.
  """
  model = nnx.eval_shape(lambda: create_model(config, nnx.Rngs(params=rng)))
  model.train()
  train_graphdef = nnx.graphdef(model)
  model.eval()
  eval_graphdef = nnx.graphdef(model)

  def init():
    params = nnx.to_pure_dict(nnx.state(create_model(config, nnx.Rngs(params=rng))))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params))

  shardings = sharding.named_shardings(mesh, jax.eval_shape(init))
  return train_graphdef, eval_graphdef, jax.jit(init, out_shardings=shardings)()


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy, `[N]` float32, from integer labels `[N]`."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def correct_topk(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """1.0 where the label is among the k highest logits, `[N]` float32."""
  _, topk = jax.lax.top_k(logits, k)
  return jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)


def train_step(state: TrainState, batch: Batch, dropout_rng: jax.Array, *,
               apply_fn, tx: optax.GradientTransformation
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on `batch` = {'image': [N, H, W, 3] float32, 'label': [N] int32}.

  `apply_fn(params, images, dropout_key) -> logits` is the model in train mode,
  e.g. `sharding.sharded_apply(train_graphdef, ...)`. Returns the new state and
  the batch's mean loss, top-1 and top-5 accuracy.
  """
  dropout_key = jax.random.fold_in(dropout_rng, state.step)

  def loss_fn(params):
    logits = apply_fn(params, batch['image'], dropout_key)
    return cross_entropy_loss(logits, batch['label']).mean(), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
      'loss': loss,
      'top1': correct_topk(logits, batch['label'], 1).mean(),
      'top5': correct_topk(logits, batch['label'], 5).mean(),
  }
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def crop_averaged_logits(apply_fn, params, crops: jax.Array) -> jax.Array:
  """log of the softmax averaged over crops (Sec. 4.1's 10-crop test), `[N, classes]`.

  `crops` `[N, C, H, W, 3]` run as one batch of N·C images. The result is a valid
  logit vector: its softmax is the averaged softmax, so cross-entropy and top-k
  follow from it unchanged.
  """
  n, c = crops.shape[:2]
  logits = apply_fn(params, crops.reshape(n * c, *crops.shape[2:]), jax.random.key(0))
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(n, c, -1)
  return jax.nn.logsumexp(log_probs, axis=1) - jnp.log(c)


def eval_step(params, batch: Batch, *, apply_fn) -> dict[str, jax.Array]:
  """Sums of loss, top-1 and top-5 hits and the example count over a padded batch.

  `apply_fn` is the model in eval mode (its dropout key is unused);
  `batch['image']` is `[N, H, W, 3]`, or `[N, C, H, W, 3]` to average the softmax
  over C crops; `batch['mask']` `[N]` is 1 for real examples and 0 for padding.
  """
  if batch['image'].ndim == 5:
    logits = crop_averaged_logits(apply_fn, params, batch['image'])
  else:
    logits = apply_fn(params, batch['image'], jax.random.key(0))
  mask = batch['mask'].astype(jnp.float32)
  return {
      'loss': jnp.sum(cross_entropy_loss(logits, batch['label']) * mask),
      'top1': jnp.sum(correct_topk(logits, batch['label'], 1) * mask),
      'top5': jnp.sum(correct_topk(logits, batch['label'], 5) * mask),
      'count': jnp.sum(mask),
  }


def compiler_options() -> dict[str, str] | None:
  """XLA options for the train and eval steps on this backend.

  On CPU, jaxlib 0.10 hands convolutions to YNNPACK by default, which runs
  AlexNet's convolutions (above all the kernel gradients) 2-5× slower than XLA's
  own Eigen ones (benchmarks/README.md): keep YNNPACK for the matmuls only.
  """
  if jax.default_backend() != 'cpu':
    return None
  return {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}


def jit_steps(mesh: jax.sharding.Mesh, train_graphdef: nnx.GraphDef,
              eval_graphdef: nnx.GraphDef, state: TrainState,
              tx: optax.GradientTransformation):
  """`train_step(state, batch, dropout_rng)` and `eval_step(params, batch)`, jitted
  for `mesh`: the state keeps its `sharding.PARTITION_RULES` placement (and is
  donated), batches are split over 'data', metrics come back replicated."""
  state_shardings = sharding.named_shardings(mesh, state)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  train_apply = sharding.sharded_apply(train_graphdef, state.params, mesh)
  p_train_step = jax.jit(
      functools.partial(train_step, apply_fn=train_apply, tx=tx),
      out_shardings=(state_shardings, replicated), donate_argnums=0,
      compiler_options=compiler_options())
  return p_train_step, jit_eval_step(mesh, eval_graphdef, state.params)


def jit_eval_step(mesh: jax.sharding.Mesh, eval_graphdef: nnx.GraphDef, params):
  """`eval_step(params, batch)` jitted for `mesh`; the sums come back replicated."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  eval_apply = sharding.sharded_apply(eval_graphdef, params, mesh)
  return jax.jit(functools.partial(eval_step, apply_fn=eval_apply),
                 out_shardings=replicated, compiler_options=compiler_options())


def restore_params(config: ml_collections.ConfigDict, workdir: str, step: int | None = None,
                   mesh: jax.sharding.Mesh | None = None
                   ) -> tuple[nnx.GraphDef, dict[str, Any], int]:
  """(eval graphdef, params, step) of a checkpoint in `workdir/checkpoints`.

  Args:
    config: the run's config (it fixes the parameter shapes).
    workdir: a training run's workdir.
    step: the checkpoint's step; None for the latest.
    mesh: where to place the params (`PARTITION_RULES`), whatever mesh wrote the
      checkpoint; None for the first device alone.

  Raises:
    FileNotFoundError: if `workdir` has no checkpoint, or none at `step`.
  """
  if mesh is None:
    mesh = sharding.create_mesh(ml_collections.ConfigDict({'data': 1, 'model': 1}),
                                devices=jax.devices()[:1])
  checkpoint_dir = os.path.join(os.path.abspath(workdir), 'checkpoints')
  missing = FileNotFoundError(
      f'No checkpoint in {checkpoint_dir}. Pass the --workdir of a training run, or '
      'train first: python -m alexnet_jax.main --config=CONFIG --workdir=DIR.')
  if not os.path.isdir(checkpoint_dir):  # CheckpointManager would create it.
    raise missing
  # The schedule's value does not change the optimizer state's structure.
  tx = create_optimizer(config, optax.constant_schedule(config.learning_rate))
  _, eval_graphdef, shapes = jax.eval_shape(
      lambda: create_train_state(config, tx, jax.random.key(0), mesh))
  # eval_shape drops the shardings; Orbax places each array by its target's.
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, sharding.named_shardings(mesh, shapes))
  with ocp.CheckpointManager(checkpoint_dir) as checkpoints:
    steps = checkpoints.all_steps()
    if not steps:
      raise missing
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise FileNotFoundError(f'No checkpoint of step {step} in {checkpoint_dir}; '
                              f'its steps are {sorted(steps)}.')
    state = checkpoints.restore(step, args=ocp.args.StandardRestore(target))
  return eval_graphdef, state.params, step


def evaluate(eval_fn, params, batches) -> dict[str, float]:
  """Mean loss, top-1 and top-5 over every (unpadded) example of `batches`."""
  totals = None
  for batch in batches:
    sums = eval_fn(params, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals['count'])
  return {'loss': float(totals['loss']) / count, 'top1': float(totals['top1']) / count,
          'top5': float(totals['top5']) / count, 'count': int(count)}


def _num_steps(config, steps_per_epoch: int) -> int:
  if config.num_train_steps > 0:
    return config.num_train_steps
  return int(config.num_epochs * steps_per_epoch)


def _every(value: int, steps_per_epoch: int) -> int:
  """Config periods: a positive number of steps, or <= 0 for once per epoch."""
  return value if value > 0 else steps_per_epoch


class _MetricsLog:
  """The workdir's `metrics.jsonl`: one JSON object per logged step."""

  def __init__(self, path: str, resume_step: int):
    self.path = path
    # A resumed run logs again what came after its checkpoint: drop the old lines.
    kept = []
    if os.path.exists(path):
      with open(path) as f:
        kept = [line for line in f if json.loads(line)['step'] <= resume_step]
    with open(path, 'w') as f:
      f.writelines(kept)

  def write(self, step: int, metrics: dict[str, float]):
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': step, **metrics}) + '\n')


def _check_finite(step: int, loss: float, checkpoint_dir: str):
  if not np.isfinite(loss):
    raise FloatingPointError(
        f'Training loss is {loss} at step {step}. Lower --config.learning_rate (or '
        'check the input data); a rerun resumes from the last checkpoint in '
        f'{checkpoint_dir}, which is finite.')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains, evaluates and checkpoints in `workdir`; resumes from its latest checkpoint.

  Writes `metrics.jsonl`, TensorBoard events, `checkpoints/` and, at the end,
  `results.json` and `plots/` (see README). Returns the contents of `results.json`.

  Raises:
    FloatingPointError: if the training loss becomes NaN or infinite.
    Preempted: after `request_stop` (SIGTERM), once the current step is checkpointed.
  """
  # Imported here: both import TensorFlow, which the steps above do not need.
  from clu import metric_writers, periodic_actions
  from alexnet_jax import input_pipeline

  start_time = time.time()
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.create_mesh(config.mesh)
  logging.info('Mesh: %s', dict(mesh.shape))
  sharding.check_batch_sizes(mesh, config, 'batch_size', 'eval_batch_size')
  data = input_pipeline.create_datasets(config)
  steps_per_epoch = data.num_train_examples // config.batch_size
  num_steps = _num_steps(config, steps_per_epoch)
  eval_every = _every(config.eval_every_steps, steps_per_epoch)
  schedule = create_learning_rate_schedule(config, steps_per_epoch, num_steps)
  tx = create_optimizer(config, schedule)
  params_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
  train_graphdef, eval_graphdef, state = create_train_state(config, tx, params_rng, mesh)

  checkpoint_dir = os.path.join(workdir, 'checkpoints')
  checkpoints = ocp.CheckpointManager(checkpoint_dir, options=ocp.CheckpointManagerOptions(
      save_interval_steps=_every(config.checkpoint_every_steps, steps_per_epoch),
      max_to_keep=config.keep_checkpoints))
  if checkpoints.latest_step() is not None:
    state = checkpoints.restore(checkpoints.latest_step(), args=ocp.args.StandardRestore(state))
    logging.info('Resumed from step %d in %s.', int(state.step), checkpoint_dir)
  initial_step = int(state.step)

  p_train_step, p_eval_step = jit_steps(mesh, train_graphdef, eval_graphdef, state, tx)
  test_batches = lambda: (sharding.global_batch(mesh, b) for b in data.test_batches())
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  metrics_log = _MetricsLog(os.path.join(workdir, 'metrics.jsonl'), initial_step)
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=num_steps, writer=writer, every_steps=config.log_every_steps)
  if initial_step == 0:
    writer.write_hparams(config.to_dict())

  train_iter = data.train_batches(start_step=initial_step)
  window, window_start, train_time, train_images = [], time.time(), 0.0, 0
  for step in range(initial_step + 1, num_steps + 1):
    state, step_metrics = p_train_step(
        state, sharding.global_batch(mesh, next(train_iter)), dropout_rng)
    window.append(step_metrics)
    report_progress(step)
    if step % config.log_every_steps == 0 or step == num_steps:
      summary = {f'train_{k}': float(v) for k, v in
                 jax.device_get(jax.tree.map(lambda *x: jnp.mean(jnp.stack(x)), *window)).items()}
      elapsed = time.time() - window_start
      if step - len(window) > initial_step:  # The first window includes compilation.
        train_time += elapsed
        train_images += len(window) * config.batch_size
      summary['train_images_per_sec'] = len(window) * config.batch_size / elapsed
      summary['learning_rate'] = float(schedule(step - 1))
      summary['epoch'] = step / steps_per_epoch
      _check_finite(step, summary['train_loss'], checkpoint_dir)
      writer.write_scalars(step, summary)
      metrics_log.write(step, summary)
      window, window_start = [], time.time()
    if step % eval_every == 0 or step == num_steps:
      jax.block_until_ready(state)  # Train steps still in flight count as training.
      eval_start = time.time()
      with report_progress.timed('eval'):
        test = evaluate(p_eval_step, state.params, test_batches())
      test_metrics = {f'test_{k}': v for k, v in test.items() if k != 'count'}
      writer.write_scalars(step, test_metrics)
      metrics_log.write(step, {'epoch': step / steps_per_epoch, **test_metrics})
      logging.info('step %d epoch %.2f: test top-1 %.4f top-5 %.4f loss %.4f', step,
                   step / steps_per_epoch, test['top1'], test['top5'], test['loss'])
      window_start += time.time() - eval_start  # Keep eval out of train img/s.
    stop = _STOP.is_set() and step < num_steps
    if checkpoints.should_save(step) or stop or step == num_steps:
      _check_finite(step, float(step_metrics['loss']), checkpoint_dir)  # Never save NaNs.
      checkpoints.save(step, args=ocp.args.StandardSave(state), force=True)
    if stop:
      checkpoints.wait_until_finished()
      raise Preempted(f'Stopped on request (SIGTERM) after step {step}, checkpointed in '
                      f'{checkpoint_dir}; rerun the same command to resume.')
  checkpoints.wait_until_finished()

  if initial_step >= num_steps:  # Nothing left to train: evaluate what was restored.
    test = evaluate(p_eval_step, state.params, test_batches())
  results = {
      'step': int(state.step),
      'epoch': int(state.step) / steps_per_epoch,
      'test_top1': test['top1'],
      'test_top5': test['top5'],
      'test_loss': test['loss'],
      'n_test_examples': test['count'],
      'train_images_per_sec': train_images / train_time if train_time else None,
      'wall_seconds': time.time() - start_time,
  }
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)
  if jax.process_index() == 0:
    try:  # Pictures are a convenience: never lose a finished run to a plotting error.
      from alexnet_jax import plots  # pylint: disable=g-import-not-at-top
      plots.write_all(config, workdir)
    except Exception:  # pylint: disable=broad-except
      logging.warning('Could not write the plots to %s.', workdir, exc_info=True)
  writer.flush()
  return results
