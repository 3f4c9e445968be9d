"""Fine-tuning with Caffe's recipe, on top of any dataset config (default: Fashion-MNIST).

  python -m alexnet_jax.main --config=configs/finetune.py:fashion_mnist \
      --config.init_from=runs/source --workdir=runs/finetune

Caffe's examples/finetune_flickr_style (models/finetune_flickr_style/train_val.prototxt
and solver.prototxt) starts every layer of bvlc_reference_caffenet by name and renames
fc8 (fc8_flickr) so that it starts from its init; that layer learns at lr_mult 10
(biases 20), the others at 1 (biases 2); base_lr 0.001, divided by 10 every 20,000 of
100,000 iterations (from scratch: 0.01 and 450,000). Here: `reinit=('fc8',)`,
`lr_multipliers=(('fc8', 10.0),)` on top of bias_lr_multiplier 2, rate 0.001 without
warm-up, the 'step' schedule dividing by 10 at 20/40/60/80% of the run, and 100/450
of the dataset config's epochs (rounded, at least 1). `init_from` must be given (a training run's or an
import_caffe workdir); freeze the conv layers with
`--config.lr_multipliers="(('fc8', 10.0), ('conv[1-5]', 0.0))"`.
"""

import importlib

# solver.prototxt of finetune_flickr_style vs bvlc_reference_caffenet's.
_ITERATIONS_FRACTION = 100_000 / 450_000
_DECAYS = (0.2, 0.4, 0.6, 0.8)  # stepsize 20,000 of max_iter 100,000.


def get_config(base: str = 'fashion_mnist'):
  """The fine-tuning recipe on `configs/<base>.py` (e.g. 'fashion_mnist', 'imagenet')."""
  config = importlib.import_module(f'configs.{base}').get_config()
  config.reinit = ('fc8',)
  config.lr_multipliers = (('fc8', 10.0),)
  config.learning_rate = 0.001
  config.lr_schedule = 'step'
  config.warmup_steps = 0
  config.num_epochs = max(1, round(config.num_epochs * _ITERATIONS_FRACTION))
  config.lr_decay_steps = None
  config.lr_decay_epochs = tuple(round(f * config.num_epochs, 2) for f in _DECAYS)
  return config
