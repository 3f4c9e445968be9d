#!/bin/bash
# The large-batch experiment of README "Large batches": the main command's run
# (configs/fashion_mnist.py, 10 epochs, seed 0) at batch 128, then at batch 4,096 as
# You, Gitman & Ginsburg 2017 ("Large Batch Training of Convolutional Networks") compare
# them on ImageNet, for the paper's model and AlexNet-BN:
#   alexnet_sgd_128     the baseline, the main command as it is (lr 0.04, cosine, 300
#                       warm-up steps);
#   alexnet_sgd_4096    Goyal et al. 2017: the same rate per 128 examples, scaled linearly
#                       (lr_reference_batch 128: 0.04 x 32 = 1.28), warmed up for 5/90
#                       of the run as their 5 of 90 epochs: 0.56 of these 10 epochs, 8 of
#                       the 140 steps (60,000 // 4,096 = 14 a epoch); cosine as the baseline;
#   alexnet_lars_4096   LARS as You et al. ran AlexNet at 4K (borisgin/nvcaffe, B. Ginsburg's
#                       Caffe, models/bvlc_alexnet/solver.prototxt at 08cad115, lines 12-21:
#                       base_lr 10 "# B=4096", local_lr_auto, local_gw_ratio 0.001, a
#                       linear ramp-up, poly power 2): rate 10, trust coefficient 0.001,
#                       'polynomial' power 2, the same 8 warm-up steps (theirs: 1,250 of
#                       31,300 iterations, 4% of the run; 8 of 140 is 5.7%);
#   alexnet_bn_sgd_4096, alexnet_bn_lars_4096   the same two with --config.model=alexnet_bn.
# Each batch of 4,096 is taken 128 at a time (grad_accum_steps 32): one update of 4,096
# with the activations of 128 at a time (on CPU, where the micro-batches are unrolled
# (steps._accumulated), 3.7 GB at peak against the baseline's 1.75).
#
# The rates. The papers' rates above did not carry over to this data (README "Large
# batches": for the paper's model 0.32 already failed and LARS 10 diverged; AlexNet-BN
# went NaN at 1.28), so the defaults are those a 2-epoch launch.sweep picked (the best
# test top-1 after 2 epochs; README gives the commands and the table): 0.00125 per 128
# (0.04, the baseline's own rate, unscaled) for AlexNet-BN's SGD; LARS 1 for the paper's
# model, while AlexNet-BN keeps LARS 10, which trained. For the paper's model's SGD the
# pick, 0.005 per 128 (0.16), went NaN at step 36 of the full run, so the default is the
# next rate down, 0.0025 (0.08), which did not train either (README). Under LARS the
# biases are not adapted (as SimCLR's LARS, alexnet_jax/optimizers.py): they step at the
# rate itself (x2, Caffe's bias lr_mult), where Caffe's LARC scales them by their own
# trust ratio too; likely why the paper's model, with no BN, needs a lower LARS rate here
# than there. PAPER_RATES=1 runs the papers' rates instead (give it another OUT_DIR).
#
#   bash launch/large_batch_experiment.sh [OUT_DIR]     (default runs/large_batch)
#
# Finished runs are skipped and unfinished ones resume from their last checkpoint (one an
# epoch), so a rerun resumes; the table (launch.results: test top-1/top-5/loss, steps, wall
# seconds of each run's last invocation) goes to OUT_DIR/results.md. Environment:
#   RUNS="alexnet_sgd_128 ..."   a subset of the five (default all, in the order above);
#   SGD_RATE, BN_SGD_RATE        SGD's rate per 128 examples at 4,096, for each model
#                                (defaults 0.0025, 0.00125; the papers' 0.04);
#   LARS_RATE, BN_LARS_RATE      LARS's rate, for each model (defaults 1, 10;
#                                the papers' 10);
#   PAPER_RATES=1                the papers' rates where the four above are not set;
#   STEPS=N                      a smoke test: N steps a run, one central-crop test, in
#                                runs/large_batch_smoke by default;
#   EXTRA="--config.KEY=VALUE ..."  flags added to every run (e.g. a smaller batch for a
#                                quick smoke test).
set -euo pipefail
py=${PYTHON:-.venv/bin/python}
steps=${STEPS:-}
out=${1:-runs/large_batch${steps:+_smoke}}
runs=${RUNS:-alexnet_sgd_128 alexnet_sgd_4096 alexnet_lars_4096 alexnet_bn_sgd_4096 alexnet_bn_lars_4096}
picked=(0.0025 0.00125 1 10)  # SGD per 128, AlexNet-BN's; LARS, AlexNet-BN's.
[[ -n ${PAPER_RATES:-} ]] && picked=(0.04 0.04 10 10)
sgd_rate=${SGD_RATE:-${picked[0]}}
bn_sgd_rate=${BN_SGD_RATE:-${picked[1]}}
lars_rate=${LARS_RATE:-${picked[2]}}
bn_lars_rate=${BN_LARS_RATE:-${picked[3]}}

base=(--config=configs/fashion_mnist.py --config.seed=0)
if [[ -n $steps ]]; then
  base+=(--config.num_train_steps="$steps" --config.eval_every_steps="$steps"
    --config.eval_crops=1 --config.log_every_steps=1)
fi
read -r -a extra_all <<<"${EXTRA:-}"
large=(--config.batch_size=4096 --config.grad_accum_steps=32 --config.warmup_steps=8
  --config.checkpoint_every_steps=14)
sgd=(--config.lr_reference_batch=128)
lars=(--config.optimizer=lars --config.lars_trust_coefficient=0.001
  --config.lr_schedule=polynomial --config.lr_poly_power=2.0)

flags_of() {  # The run's flags on top of the baseline's.
  local bn=(--config.model=alexnet_bn)
  case $1 in
    alexnet_sgd_128) ;;
    alexnet_sgd_4096) echo "${large[*]} ${sgd[*]} --config.learning_rate=$sgd_rate" ;;
    alexnet_lars_4096) echo "${large[*]} ${lars[*]} --config.learning_rate=$lars_rate" ;;
    alexnet_bn_sgd_4096)
      echo "${bn[*]} ${large[*]} ${sgd[*]} --config.learning_rate=$bn_sgd_rate" ;;
    alexnet_bn_lars_4096)
      echo "${bn[*]} ${large[*]} ${lars[*]} --config.learning_rate=$bn_lars_rate" ;;
    *) echo "Unknown run '$1' in RUNS." >&2; return 1 ;;
  esac
}

failed=()
for name in $runs; do
  read -r -a extra <<<"$(flags_of "$name")"
  workdir=$out/$name
  [[ -f $workdir/results.json ]] && continue
  mkdir -p "$workdir"
  # A run that fails (a rate that diverges stops with a non-finite loss) is reported and
  # the next one starts: each run is a data point of the experiment.
  if ! "$py" -m alexnet_jax.main --workdir="$workdir" --noplots "${base[@]}" "${extra[@]}" \
    "${extra_all[@]}" 2>&1 | tee -a "$workdir/train.log"; then
    echo "Run $name failed: the end of $workdir/train.log says why." >&2
    failed+=("$name")
    continue
  fi
  # The settings that differ between runs, as launch.sweep records its overrides, for
  # launch.results' columns; from the config the run used.
  "$py" - "$workdir" <<'PY'
import json, os, sys
from alexnet_jax import files
with open(os.path.join(sys.argv[1], 'config.json')) as f:
  config = json.load(f)
keys = ('model', 'batch_size', 'grad_accum_steps', 'optimizer', 'learning_rate',
        'lr_reference_batch', 'lr_schedule', 'warmup_steps')
overrides = {key: config.get(key, 'alexnet' if key == 'model' else None) for key in keys}
files.write_text(os.path.join(sys.argv[1], 'overrides.json'), json.dumps(overrides) + '\n')
PY
done

"$py" -m launch.results "$out"
if ((${#failed[@]})); then
  echo "Failed: ${failed[*]}" >&2
  exit 1
fi
