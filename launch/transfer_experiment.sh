#!/bin/bash
# The transfer experiment of README "Transfer": Fashion-MNIST classes 0-4 as the source
# task, classes 5-9 as the target with the first 50 or 500 train images of each class.
# Per seed: one source run; then for each target size, 300 steps (batch 50) of
#   finetune  configs/finetune.py (Caffe's recipe: fc8 anew at x10, lr 0.001, /10 at
#             20/40/60/80% of the steps),
#   frozen    the same with conv1-5 frozen (lr multiplier 0),
#   scratch   configs/fashion_mnist.py at lr 0.01 (its 0.04 is for batch 128, and
#             diverged here at batch 50), cosine, 30 warm-up steps,
# and DeCAF's probe: a logistic regression on the source run's fc7 features.
#
#   bash launch/transfer_experiment.sh [OUT_DIR]       (default runs/transfer)
#
# Finished runs are skipped, so a rerun resumes; the table goes to OUT_DIR/results.md.
set -euo pipefail
out=${1:-runs/transfer}
py=${PYTHON:-.venv/bin/python}
seeds=${SEEDS:-0 1 2}
steps=300
target=(--config.classes="(5,6,7,8,9)" --config.num_classes=5 --config.batch_size=50
  --config.num_train_steps=$steps --config.eval_every_steps=$steps
  --config.checkpoint_every_steps=$steps --config.log_every_steps=50)

train() {  # workdir, then main's flags; skipped once it has a results.json.
  local workdir=$1
  shift
  [[ -f $workdir/results.json ]] && return
  "$py" -m alexnet_jax.main --workdir="$workdir" --noplots "$@"
}

for seed in $seeds; do
  source=$out/source/seed=$seed
  train "$source" --config=configs/fashion_mnist.py --config.classes="(0,1,2,3,4)" \
    --config.num_classes=5 --config.num_epochs=3 --config.seed=$seed
  for n in 50 500; do
    subset=("${target[@]}" --config.train_examples_per_class=$n --config.seed=$seed)
    finetune=(--config=configs/finetune.py:fashion_mnist --config.init_from="$source"
      --config.lr_decay_steps="(60,120,180,240)" "${subset[@]}")
    train "$out/finetune_$n/seed=$seed" "${finetune[@]}"
    train "$out/frozen_$n/seed=$seed" "${finetune[@]}" \
      --config.lr_multipliers="(('fc8',10.0),('conv[1-5]',0.0))"
    train "$out/scratch_$n/seed=$seed" --config=configs/fashion_mnist.py \
      --config.learning_rate=0.01 --config.warmup_steps=30 "${subset[@]}"
    probe=$out/probe_$n/seed=$seed.npz
    if [[ ! -f $probe ]]; then
      mkdir -p "$out/probe_$n"
      "$py" -m alexnet_jax.features --workdir="$source" --layer=fc7 --probe --output="$probe" \
        --config=configs/fashion_mnist.py --config.classes="(5,6,7,8,9)" \
        --config.num_classes=5 --config.train_examples_per_class=$n
    fi
  done
done

"$py" - "$out" <<'PY'
"""Mean and spread (sample std over seeds) of the target's test top-1 per method and size."""
import glob, json, os, sys
import numpy as np
from alexnet_jax import files

out = sys.argv[1]
rows = ['| method | 50 / class | 500 / class |', '| --- | --- | --- |']
for method in ('finetune', 'frozen', 'probe', 'scratch'):
  cells = []
  for n in (50, 500):
    if method == 'probe':
      paths = sorted(glob.glob(f'{out}/probe_{n}/seed=*.npz'))
      top1 = [float(np.load(p)['probe_top1']) for p in paths]
    else:
      paths = sorted(glob.glob(f'{out}/{method}_{n}/seed=*/results.json'))
      top1 = [json.load(open(p))['test_top1'] for p in paths]
    std = np.std(top1, ddof=1) if len(top1) > 1 else float('nan')
    each = ', '.join(f'{t:.4f}' for t in top1)
    cells.append(f'{np.mean(top1):.4f} ± {std:.4f} ({each})')
  rows.append(f'| {method} | ' + ' | '.join(cells) + ' |')
table = '\n'.join(rows) + '\n'
files.write_text(os.path.join(out, 'results.md'), table)  # Whole or not at all.
print(table, end='')
PY
