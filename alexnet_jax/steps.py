"""The train state and the jitted steps: `train_step`, `eval_step` and the model's one
inference path (`eval_apply`). Pure JAX: importing this module needs no TensorFlow.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import optax

from alexnet_jax import augment
from alexnet_jax import models
from alexnet_jax import sharding

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint holds; data order and dropout keys derive from `step`.

  `params` is a plain dict, e.g. params['conv2']['kernel'] of shape (5, 5, 48, 256).
  """

  step: jax.Array
  params: dict[str, Any]
  opt_state: optax.OptState


def create_model(
  config: ml_collections.ConfigDict, rngs: nnx.Rngs
) -> models.AlexNet | models.AlexNetOWT:
  """The network `config.model` names, its parameters drawn from `rngs`: 'alexnet' (the
  paper's two towers) or 'alexnet_owt' (torchvision's one column; `config.lrn` does
  not apply to it).

  Raises:
    ValueError: for a model this module cannot build.
  """
  common = dict(
    image_size=config.image_size,
    dropout_rate=config.dropout_rate,
    init=config.init,
    dtype=jnp.dtype(config.dtype),
    rngs=rngs,
  )
  if config.model == 'alexnet':
    return models.AlexNet(config.num_classes, lrn=config.lrn, **common)
  if config.model == 'alexnet_owt':
    return models.AlexNetOWT(config.num_classes, **common)
  raise ValueError(f"config.model={config.model!r}: use 'alexnet' or 'alexnet_owt'.")


def num_towers(config: ml_collections.ConfigDict) -> int:
  """How many towers `config.model`'s layers have (2 for the paper's, 1 for torchvision's):
  how conv1's kernels are drawn (`plots.conv1_filters`)."""
  return 1 if config.model == 'alexnet_owt' else models.NUM_TOWERS


def graphdefs(config: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, nnx.GraphDef]:
  """(train, eval) graphdefs of the model: the same network with dropout on or off."""
  model = nnx.eval_shape(lambda: create_model(config, nnx.Rngs(params=0)))
  model.train()
  train_graphdef = nnx.graphdef(model)
  model.eval()
  return train_graphdef, nnx.graphdef(model)


def init_params(config: ml_collections.ConfigDict, rng: jax.Array) -> dict[str, Any]:
  """The model's initial parameters as a plain dict (e.g. ['conv1']['kernel'])."""
  return nnx.to_pure_dict(nnx.state(create_model(config, nnx.Rngs(params=rng))))


def abstract_params(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """`jax.ShapeDtypeStruct`s of the parameters, with their shardings on `mesh`."""
  shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    shapes,
    sharding.named_shardings(mesh, shapes),
  )


def create_train_state(
  config: ml_collections.ConfigDict,
  tx: optax.GradientTransformation,
  rng: jax.Array,
  mesh: jax.sharding.Mesh,
) -> TrainState:
  """Initial state, created directly with its shardings on `mesh`.

  The initial values do not depend on the mesh (JAX's random bits are
  sharding-invariant), so runs on different meshes start from the same weights.
  """

  def init():
    params = init_params(config, rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  shardings = sharding.named_shardings(mesh, jax.eval_shape(init))
  return jax.jit(init, out_shardings=shardings)()


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy, `[N]` float32, from integer labels `[N]`."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def correct_topk(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """1.0 where the label is among the k highest logits, `[N]` float32 (k is capped
  at the class count)."""
  _, topk = jax.lax.top_k(logits, min(k, logits.shape[-1]))
  return jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)


def micro_batches(batch: Batch, k: int) -> Batch:
  """Each `[N, ...]` array as `[k, N / k, ...]`: micro-batch i holds rows i, i + k,
  i + 2k, ... With the rows split over 'data' in blocks of N / D (D devices, N / D
  divisible by k), each device's rows of micro-batch i are among its own rows, so the
  split moves no data between devices, and micro-batch i is the same global array on
  every mesh (dropout then draws the same mask for it, see `models.Dropout`).

  Raises:
    ValueError: if N is not divisible by k.
  """
  rows = jax.tree.leaves(batch)[0].shape[0]
  if rows % k:
    raise ValueError(f'A batch of {rows} rows does not split into {k} micro-batches.')
  return jax.tree.map(lambda x: x.reshape(rows // k, k, *x.shape[1:]).swapaxes(0, 1), batch)


def _accumulated(grad_fn, params, batch: Batch, dropout_key: jax.Array, k: int):
  """`grad_fn(params, batch, key)`'s ((loss, aux), grads) averaged over k micro-batches
  of `batch`, one at a time (`lax.scan`: only N / k rows' activations live at once).
  Micro-batch i draws its dropout from `fold_in(dropout_key, i)`."""
  micro = micro_batches(batch, k)

  def add_micro_batch(sums, micro_batch_and_index):
    micro_batch, i = micro_batch_and_index
    values = grad_fn(params, micro_batch, jax.random.fold_in(dropout_key, i))
    return jax.tree.map(jnp.add, sums, values), None

  first = jax.tree.map(lambda x: x[0], micro)
  shapes = jax.eval_shape(grad_fn, params, first, dropout_key)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  sums, _ = jax.lax.scan(add_micro_batch, zeros, (micro, jnp.arange(k)))
  return jax.tree.map(lambda total: total / k, sums)


def train_step(
  state: TrainState,
  batch: Batch,
  dropout_rng: jax.Array,
  *,
  apply_fn,
  tx: optax.GradientTransformation,
  normalization: augment.Normalization | None = None,
  grad_accum_steps: int = 1,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update on `batch` = {'image', 'label': [N] int32}: an input-pipeline batch
  (uint8 images, their 'flip' and 'lighting'; `augment.model_input` with
  `normalization`) or float32 model input `[N, H, W, 3]`.

  `apply_fn(params, images, dropout_key) -> logits` is the model in train mode,
  e.g. `sharding.sharded_apply(train_graphdef, ...)`. With `grad_accum_steps` k > 1
  the gradient is the mean of those of k micro-batches of N / k rows
  (`micro_batches`), computed one after another: Caffe's iter_size, one update of N
  examples in the memory of N / k (the rows on each device must divide by k).
  Returns the new state and the batch's mean loss, top-1 and top-5 accuracy (over
  all N rows), and `finite`: 1.0 when the loss and every gradient are finite (the
  loop's NaN check; the gradients' sum carries any NaN or Inf among them at the cost
  of one reduction, where a global norm costs ~10% of a CPU step: its squares are
  materialised next to the update).
  """
  dropout_key = jax.random.fold_in(dropout_rng, state.step)

  def loss_fn(params, batch, dropout_key):
    logits = apply_fn(params, augment.model_input(batch, normalization), dropout_key)
    labels = batch['label']
    top1 = correct_topk(logits, labels, 1).mean()
    top5 = correct_topk(logits, labels, 5).mean()
    return cross_entropy_loss(logits, labels).mean(), (top1, top5)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if grad_accum_steps == 1:
    (loss, (top1, top5)), grads = grad_fn(state.params, batch, dropout_key)
  else:
    (loss, (top1, top5)), grads = _accumulated(
      grad_fn, state.params, batch, dropout_key, grad_accum_steps
    )
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_sum = sum(jnp.sum(g) for g in jax.tree.leaves(grads))
  metrics = {
    'loss': loss,
    'top1': top1,
    'top5': top5,
    'finite': (jnp.isfinite(loss) & jnp.isfinite(grad_sum)).astype(jnp.float32),
  }
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


@jax.jit
def all_finite(tree) -> jax.Array:
  """True when no leaf of `tree` holds a NaN or Inf (a bool scalar, on every process)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


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


def compiler_options() -> dict[str, str] | None:
  """XLA options for every jitted model call on this backend.

  On CPU, jaxlib 0.10 hands convolutions to YNNPACK by default, which runs
  AlexNet's convolutions (above all the kernel gradients) 2-5× slower than XLA's
  own Eigen ones (benchmarks/README.md): keep YNNPACK for the matmuls and the
  reductions. Reductions left to XLA (the bias gradients, the loss, the NaN check's
  gradient sum) become reduce-windows that take ~10% of a 227-px step.
  """
  if jax.default_backend() != 'cpu':
    return None
  return {
    'xla_cpu_experimental_ynn_fusion_type': (
      'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE'
    )
  }


def eval_logits_fn(
  mesh: jax.sharding.Mesh, eval_graphdef: nnx.GraphDef, params
) -> Callable[[Any, jax.Array], jax.Array]:
  """The model in eval mode for `mesh`, unjitted: `logits(params, images)`.

  `images` is `[N, H, W, 3]` float32 split over 'data' (N divisible by its size),
  or `[N, C, H, W, 3]` for the softmax averaged over C crops
  (`crop_averaged_logits`); float32 logits `[N, classes]`.
  """
  apply = sharding.sharded_apply(eval_graphdef, params, mesh)

  def logits(params, images):
    if images.ndim == 5:
      return crop_averaged_logits(apply, params, images)
    return apply(params, images, jax.random.key(0))  # Eval mode: the key is unused.

  return logits


def eval_apply(
  mesh: jax.sharding.Mesh, eval_graphdef: nnx.GraphDef, params
) -> Callable[[Any, jax.Array], jax.Array]:
  """`eval_logits_fn` jitted, its logits replicated (readable on every process): the
  model's one inference path, for plots and predict (`eval_step` jits the same
  function together with its sums)."""
  return jax.jit(
    eval_logits_fn(mesh, eval_graphdef, params),
    out_shardings=sharding.replicated(mesh),
    compiler_options=compiler_options(),
  )


def eval_features(
  mesh: jax.sharding.Mesh, eval_graphdef: nnx.GraphDef, params, layer: str
) -> Callable[[Any, jax.Array], jax.Array]:
  """`features(params, images)`: `eval_apply` for the activations of `layer` (one of
  `models.FEATURE_LAYERS`; see `AlexNet.activations`), float32 `[N, D]` replicated,
  from `images` `[N, H, W, 3]` float32 split over 'data'."""
  apply = sharding.sharded_apply(eval_graphdef, params, mesh, layer)
  return jax.jit(
    lambda params, images: apply(params, images, jax.random.key(0)),  # Eval mode: unused key.
    out_shardings=sharding.replicated(mesh),
    compiler_options=compiler_options(),
  )


def eval_step(
  params, batch: Batch, *, logits_fn, normalization: augment.Normalization | None = None
) -> dict[str, jax.Array]:
  """Sums of loss, top-1 and top-5 hits and the example count over a padded batch.

  `logits_fn` is `eval_logits_fn(...)`; `batch['image']` is `[N, H, W, 3]` or
  `[N, C, H, W, 3]`, uint8 (normalised with `normalization`) or float32 model input;
  `batch['mask']` `[N]` is 1 for real examples and 0 for padding.
  """
  logits = logits_fn(params, augment.model_input(batch, normalization))
  mask = batch['mask'].astype(jnp.float32)
  return {
    'loss': jnp.sum(cross_entropy_loss(logits, batch['label']) * mask),
    'top1': jnp.sum(correct_topk(logits, batch['label'], 1) * mask),
    'top5': jnp.sum(correct_topk(logits, batch['label'], 5) * mask),
    'count': jnp.sum(mask),
  }


def jit_train_step(
  mesh: jax.sharding.Mesh,
  train_graphdef: nnx.GraphDef,
  state: TrainState,
  tx: optax.GradientTransformation,
  normalization: augment.Normalization | None = None,
  grad_accum_steps: int = 1,
):
  """`train_step(state, batch, dropout_rng)` jitted for `mesh`: the state keeps its
  `sharding.PARTITION_RULES` placement (and is donated), batches are split over
  'data', metrics come back replicated. `normalization`: (config.pixel_mean,
  config.pixel_std) for the input pipeline's uint8 batches; `grad_accum_steps`:
  config.grad_accum_steps."""
  train_apply = sharding.sharded_apply(train_graphdef, state.params, mesh)
  return jax.jit(
    functools.partial(
      train_step,
      apply_fn=train_apply,
      tx=tx,
      normalization=normalization,
      grad_accum_steps=grad_accum_steps,
    ),
    out_shardings=(sharding.named_shardings(mesh, state), sharding.replicated(mesh)),
    donate_argnums=0,
    compiler_options=compiler_options(),
  )


def jit_eval_step(
  mesh: jax.sharding.Mesh,
  eval_graphdef: nnx.GraphDef,
  params,
  normalization: augment.Normalization | None = None,
):
  """`eval_step(params, batch)` jitted for `mesh`; the sums come back replicated.
  `normalization` as for `jit_train_step`."""
  logits_fn = eval_logits_fn(mesh, eval_graphdef, params)
  return jax.jit(
    functools.partial(eval_step, logits_fn=logits_fn, normalization=normalization),
    out_shardings=sharding.replicated(mesh),
    compiler_options=compiler_options(),
  )
