"""Evaluation of a saved checkpoint on the whole test split, one crop or the paper's ten.

`python -m alexnet_jax.main --mode=eval --config=CONFIG --workdir=DIR` calls
`evaluate_checkpoint`; the checkpoint may come from any mesh.
"""

import json
import os
from typing import Any

from absl import logging
import jax
import ml_collections

from alexnet_jax import sharding
from alexnet_jax import train


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        step: int | None = None) -> dict[str, Any]:
  """Evaluates checkpoint `step` (None: the latest) of `workdir` on every test example.

  Runs on the mesh of `config.mesh` over the devices present; the test split's
  last batch is padded and masked. `config.eval_crops` = 10 averages the softmax
  over the paper's 10 patches (Sec. 4.1), so the model sees 10 × eval_batch_size
  images per batch.

  Returns:
    The contents of the `workdir/eval_<step>.json` it writes: 'step', 'top1',
    'top5', 'loss' (fractions in [0, 1] and mean cross-entropy), 'n_examples',
    'crops'.

  Raises:
    FileNotFoundError: if `workdir` has no checkpoint (at `step`), or the dataset's
      files are missing.
    ValueError: if eval_batch_size does not split over the mesh's data axis.
  """
  from alexnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top

  mesh = sharding.create_mesh(config.mesh)
  sharding.check_batch_sizes(mesh, config, 'eval_batch_size')
  eval_graphdef, params, step = train.restore_params(config, workdir, step, mesh)
  logging.info('Evaluating step %d of %s on mesh %s with %d crop(s).',
               step, workdir, dict(mesh.shape), config.eval_crops)
  data = input_pipeline.create_datasets(config)
  batches = (sharding.global_batch(mesh, b)
             for b in data.test_batches(crops=config.eval_crops))
  test = train.evaluate(train.jit_eval_step(mesh, eval_graphdef, params), params, batches)
  results = {'step': step, 'top1': test['top1'], 'top5': test['top5'],
             'loss': test['loss'], 'n_examples': test['count'],
             'crops': config.eval_crops}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, f'eval_{step}.json'), 'w') as f:
      json.dump(results, f, indent=2)
  logging.info('Step %d, %d examples, %d crop(s): top-1 %.4f top-5 %.4f loss %.4f', step,
               results['n_examples'], results['crops'], results['top1'], results['top5'],
               results['loss'])
  return results
