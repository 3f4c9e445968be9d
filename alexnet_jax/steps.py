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
  `batch_stats` holds a BN model's running averages (e.g. ['bn2']['mean'], float32
  `[96]`), moved by `train_step` and used in eval mode; {} for a model without BN.
  """

  step: jax.Array
  params: dict[str, Any]
  opt_state: optax.OptState
  batch_stats: dict[str, Any] = flax.struct.field(default_factory=dict)


# config.model: the network each name builds.
MODELS = ('alexnet', 'alexnet_bn', 'alexnet_owt')


def create_model(
  config: ml_collections.ConfigDict, rngs: nnx.Rngs
) -> models.AlexNet | models.AlexNetOWT:
  """The network `config.model` names, its parameters drawn from `rngs`: 'alexnet'
  (`models.AlexNet`, the paper's two towers), 'alexnet_bn' (`models.AlexNetBN`, You et
  al. 2017's) or 'alexnet_owt' (`models.AlexNetOWT`, torchvision's one column);
  `config.lrn` applies to 'alexnet' only.

  Raises:
    ValueError: for another `config.model`.
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
  if config.model == 'alexnet_bn':
    return models.AlexNetBN(config.num_classes, **common)
  if config.model == 'alexnet_owt':
    return models.AlexNetOWT(config.num_classes, **common)
  raise ValueError(f'config.model={config.model!r}: use one of {", ".join(MODELS)}.')


def num_towers(config: ml_collections.ConfigDict) -> int:
  """How many towers `config.model`'s layers have (2 for the paper's, 1 for torchvision's):
  how conv1's kernels are drawn (`plots.conv1_filters`)."""
  return 1 if config.model == 'alexnet_owt' else models.NUM_TOWERS


def graphdefs(config: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, nnx.GraphDef]:
  """(train, eval) graphdefs of the model: the same network with dropout on or off
  (and BN on the batch's statistics or its running averages)."""
  model = nnx.eval_shape(lambda: create_model(config, nnx.Rngs(params=0)))
  model.train()
  train_graphdef = nnx.graphdef(model)
  model.eval()
  return train_graphdef, nnx.graphdef(model)


def init_variables(
  config: ml_collections.ConfigDict, rng: jax.Array
) -> tuple[dict[str, Any], dict[str, Any]]:
  """The model's initial (params, batch_stats) as plain dicts (batch_stats {} without BN)."""
  model = create_model(config, nnx.Rngs(params=rng))
  return (
    nnx.to_pure_dict(nnx.state(model, nnx.Param)),
    nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
  )


def init_params(config: ml_collections.ConfigDict, rng: jax.Array) -> dict[str, Any]:
  """The model's initial parameters as a plain dict (e.g. ['conv1']['kernel'])."""
  return init_variables(config, rng)[0]


def model_variables(params: dict[str, Any], batch_stats: dict[str, Any]) -> dict[str, Any]:
  """`params` and `batch_stats` as one dict of layers (what the model in eval mode reads,
  e.g. ['bn2']['mean'] beside ['conv2']['kernel']); `params` itself without BN."""
  if not batch_stats:
    return params
  layers = {**params, **batch_stats}
  return {layer: {**params.get(layer, {}), **batch_stats.get(layer, {})} for layer in layers}


def split_variables(
  variables: dict[str, Any], batch_stats: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
  """`model_variables`' inverse: (params, batch_stats) of `variables`, the leaves of
  `batch_stats`' structure taken as the running averages."""
  stats = {
    layer: {kind: variables[layer][kind] for kind in kinds} for layer, kinds in batch_stats.items()
  }
  params = {
    layer: {kind: x for kind, x in leaves.items() if kind not in batch_stats.get(layer, {})}
    for layer, leaves in variables.items()
  }
  return {layer: leaves for layer, leaves in params.items() if leaves}, stats


def _with_shardings(shapes, mesh: jax.sharding.Mesh):
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    shapes,
    sharding.named_shardings(mesh, shapes),
  )


def abstract_params(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """`jax.ShapeDtypeStruct`s of the parameters, with their shardings on `mesh`."""
  return _with_shardings(jax.eval_shape(lambda: init_params(config, jax.random.key(0))), mesh)


def abstract_variables(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """(params, batch_stats) as `abstract_params` gives the parameters."""
  shapes = jax.eval_shape(lambda: init_variables(config, jax.random.key(0)))
  return _with_shardings(shapes, mesh)


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
    params, batch_stats = init_variables(config, rng)
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      batch_stats=batch_stats,
    )

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


def _after(tree, sums):
  """`tree` with its values unchanged (x + 0 · Σ sums) but computed only once every leaf
  of `sums` is: XLA cannot start work on it before. A non-finite sum makes it NaN (the
  step is then non-finite anyway)."""
  zero = 0.0 * sum(jnp.sum(x) for x in jax.tree.leaves(sums))
  return jax.tree.map(lambda x: x + zero.astype(x.dtype), tree)


def _unrolls_micro_batches() -> bool:
  """Whether `_accumulated` unrolls its micro-batches (on CPU) rather than scanning them."""
  return jax.default_backend() == 'cpu'


def _accumulated(grad_fn, params, batch_stats, batch: Batch, dropout_key: jax.Array, k: int):
  """`grad_fn(params, batch_stats, batch, key)`'s ((loss, (top1, top5, batch_stats)),
  grads), the loss, accuracies and grads averaged over k micro-batches of `batch`, one
  at a time (only N / k rows' activations live at once). Micro-batch i draws its
  dropout from `fold_in(dropout_key, i)` and reads the batch_stats that micro-batch
  i - 1 left (BN's running averages move once per micro-batch).

  A `lax.scan`, except on CPU: XLA:CPU rewrites convolutions into the forms its fast
  (Eigen) kernels take only in the top-level computation
  (xla/service/cpu/conv_canonicalization.h), so in a loop's body the kernel gradients
  run a naive loop (batch 256 at 67 px as 2 × 128: 31.6 s a step, 1.1 s whole). There
  the micro-batches are unrolled, each reading the parameters `_after` the previous
  sums: unrolled without that, XLA runs them side by side and sums at the end (batch
  4,096 at 67 px as 32 × 128, XLA's temporaries: 5,273 MiB; 3,384 whole, 502 in the
  scan, 899 so; benchmarks/README.md).
  """
  micro = micro_batches(batch, k)

  def add_micro_batch(carry, micro_batch_and_index, params=params):
    sums, stats = carry
    micro_batch, i = micro_batch_and_index
    (loss, (top1, top5, stats)), grads = grad_fn(
      params, stats, micro_batch, jax.random.fold_in(dropout_key, i)
    )
    return (jax.tree.map(jnp.add, sums, ((loss, (top1, top5)), grads)), stats), None

  first = jax.tree.map(lambda x: x[0], micro)
  (loss, (top1, top5, _)), grads = jax.eval_shape(grad_fn, params, batch_stats, first, dropout_key)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), ((loss, (top1, top5)), grads))
  carry = (zeros, batch_stats)
  if _unrolls_micro_batches():
    for i in range(k):
      micro_batch = jax.tree.map(lambda x, i=i: x[i], micro)
      carry, _ = add_micro_batch(carry, (micro_batch, i), _after(params, carry[0]))
  else:
    carry, _ = jax.lax.scan(add_micro_batch, carry, (micro, jnp.arange(k)))
  sums, batch_stats = carry
  ((loss, (top1, top5)), grads) = jax.tree.map(lambda total: total / k, sums)
  return (loss, (top1, top5, batch_stats)), grads


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

  `apply_fn(variables, images, dropout_key) -> (logits, batch_stats)` is the model in
  train mode (`variables`: `model_variables`), e.g. `sharding.sharded_apply(
  train_graphdef, ...)`; a BN model's running averages move once per call and come
  back as `batch_stats`. With `grad_accum_steps` k > 1 the gradient is the mean of
  those of k micro-batches of N / k rows (`micro_batches`), computed one after
  another: Caffe's iter_size, one update of N examples in the memory of N / k (the
  rows on each device must divide by k). BN then normalises each micro-batch by its
  own statistics (of its N / k rows over all devices), and its running averages move
  k times per step, as Caffe's BatchNorm does under iter_size: not the statistics of
  the whole batch.
  Returns the new state and the batch's mean loss, top-1 and top-5 accuracy (over
  all N rows), and `finite`: 1.0 when the loss and every gradient are finite (the
  loop's NaN check; the gradients' sum carries any NaN or Inf among them at the cost
  of one reduction, where a global norm costs ~10% of a CPU step: its squares are
  materialised next to the update).
  """
  dropout_key = jax.random.fold_in(dropout_rng, state.step)

  def loss_fn(params, batch_stats, batch, dropout_key):
    images = augment.model_input(batch, normalization)
    logits, batch_stats = apply_fn(model_variables(params, batch_stats), images, dropout_key)
    labels = batch['label']
    top1 = correct_topk(logits, labels, 1).mean()
    top5 = correct_topk(logits, labels, 5).mean()
    return cross_entropy_loss(logits, labels).mean(), (top1, top5, batch_stats)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if grad_accum_steps == 1:
    (loss, (top1, top5, batch_stats)), grads = grad_fn(
      state.params, state.batch_stats, batch, dropout_key
    )
  else:
    (loss, (top1, top5, batch_stats)), grads = _accumulated(
      grad_fn, state.params, state.batch_stats, batch, dropout_key, grad_accum_steps
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
  new_state = state.replace(
    step=state.step + 1, params=params, opt_state=opt_state, batch_stats=batch_stats
  )
  return new_state, metrics


@jax.jit
def all_finite(tree) -> jax.Array:
  """True when no leaf of `tree` holds a NaN or Inf (a bool scalar, on every process)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def crop_averaged_logits(apply_fn, params, crops: jax.Array) -> jax.Array:
  """log of the softmax averaged over crops (Sec. 4.1's 10-crop test), `[N, classes]`.

  `apply_fn(params, images, key) -> (logits, batch_stats)` as `sharding.sharded_apply`;
  `crops` `[N, C, H, W, 3]` run as one batch of N·C images. The result is a valid
  logit vector: its softmax is the averaged softmax, so cross-entropy and top-k
  follow from it unchanged.
  """
  n, c = crops.shape[:2]
  logits, _ = apply_fn(params, crops.reshape(n * c, *crops.shape[2:]), jax.random.key(0))
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

  `params` here and in the eval functions below are the model's variables
  (`model_variables`: the parameters, and a BN model's running averages, which eval
  mode normalises with); `restore_params` gives them. `images` is `[N, H, W, 3]` float32 split over 'data' (N divisible by its size),
  or `[N, C, H, W, 3]` for the softmax averaged over C crops
  (`crop_averaged_logits`); float32 logits `[N, classes]`.
  """
  apply = sharding.sharded_apply(eval_graphdef, params, mesh)

  def logits(params, images):
    if images.ndim == 5:
      return crop_averaged_logits(apply, params, images)
    return apply(params, images, jax.random.key(0))[0]  # Eval mode: the key is unused.

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
    lambda params, images: apply(params, images, jax.random.key(0))[0],  # Eval mode: unused key.
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
  variables = model_variables(state.params, state.batch_stats)
  train_apply = sharding.sharded_apply(train_graphdef, variables, mesh)
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
