"""Evaluation on the whole test split: the sums over padded batches, and `--mode=eval` of
a saved checkpoint with one crop or the paper's ten, on any mesh and process count.
"""

import os
from typing import Any

from absl import logging
import jax
import ml_collections

from alexnet_jax import checkpoints
from alexnet_jax import config_lib
from alexnet_jax import files
from alexnet_jax import sharding
from alexnet_jax import steps as steps_lib


def evaluate(eval_fn, params, batches) -> dict[str, float]:
  """Mean loss, top-1 and top-5 over every (unpadded) example of `batches`.

  Args:
    eval_fn: `steps.jit_eval_step(...)`: (params, batch) → replicated sums 'loss',
      'top1', 'top5', 'count' over the batch's unmasked rows, so every process gets
      the totals over all processes' examples.
    params: the model's parameters, placed as `sharding.named_shardings` says.
    batches: global batches ('image' float32 `[B, crops, H, W, 3]` or `[B, H, W, 3]`,
      'label' int32 `[B]`, 'mask' `[B]`: 1 for examples, 0 for padding; see
      `input_pipeline`).

  Returns:
    'loss' (mean cross-entropy, nats), 'top1', 'top5' (fractions in [0, 1]) and
    'count' (examples counted).

  Raises:
    ValueError: if `batches` holds no example.
  """
  totals = None
  for batch in batches:
    sums = eval_fn(params, batch)
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  totals = jax.device_get(totals) if totals is not None else {'count': 0}
  count = float(totals['count'])
  if not count:
    raise ValueError('No test example to evaluate: check the test split and its files.')
  return {
    'loss': float(totals['loss']) / count,
    'top1': float(totals['top1']) / count,
    'top5': float(totals['top5']) / count,
    'count': int(count),
  }


def evaluate_checkpoint(
  config: ml_collections.ConfigDict, workdir: str, step: int | None = None
) -> dict[str, Any]:
  """Evaluates checkpoint `step` (None: the latest) of `workdir` on every test example.

  Runs on the mesh of `config.mesh` over the devices present, every process on its
  part of the test split; the last batches are padded and masked. `config.eval_crops`
  = 10 averages the softmax over the paper's 10 patches (Sec. 4.1), so the model sees
  10 × eval_batch_size images per batch.

  Returns:
    The contents of the `workdir/eval_<step>.json` that process 0 writes: 'step',
    'top1', 'top5', 'loss' (fractions in [0, 1] and mean cross-entropy),
    'n_examples', 'crops'.

  Raises:
    FileNotFoundError: if `workdir` has no checkpoint (at `step`), or the dataset's
      files are missing.
    config_lib.ConfigError: if `config.classes` is not the run's
      (`config_lib.check_same_classes`).
  """
  from alexnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top

  config_lib.check_same_classes(config_lib.load(workdir), config, workdir)
  mesh = sharding.create_mesh(config.mesh)
  params, step = checkpoints.restore_params(config, workdir, mesh, step)
  logging.info(
    'Evaluating step %d of %s on mesh %s with %d crop(s).',
    step,
    workdir,
    dict(mesh.shape),
    config.eval_crops,
  )
  data = input_pipeline.create_datasets(config, *sharding.data_groups(mesh))
  batches = (sharding.global_batch(mesh, b) for b in data.test_batches(crops=config.eval_crops))
  _, eval_graphdef = steps_lib.graphdefs(config)
  eval_step = steps_lib.jit_eval_step(
    mesh, eval_graphdef, params, (config.pixel_mean, config.pixel_std)
  )
  test = evaluate(eval_step, params, batches)
  results = {
    'step': step,
    'top1': test['top1'],
    'top5': test['top5'],
    'loss': test['loss'],
    'n_examples': test['count'],
    'crops': config.eval_crops,
  }
  if jax.process_index() == 0:
    files.write_json(os.path.join(workdir, f'eval_{step}.json'), results)
  logging.info(
    'Step %d, %d examples, %d crop(s): top-1 %.4f top-5 %.4f loss %.4f',
    step,
    results['n_examples'],
    results['crops'],
    results['top1'],
    results['top5'],
    results['loss'],
  )
  return results
