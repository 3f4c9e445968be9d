"""Fine-tuning with Caffe's recipe, on top of any dataset config (default: Fashion-MNIST).

  python -m alexnet_jax.main --config=configs/finetune.py:fashion_mnist \
      --config.init_from=runs/source --workdir=runs/finetune

Caffe's examples/finetune_flickr_style (models/finetune_flickr_style/train_val.prototxt
and solver.prototxt, BVLC/caffe 9b89154) starts every layer of bvlc_reference_caffenet
by name and renames fc8 (fc8_flickr) so that it starts from its init; that layer learns
at lr_mult 10 (biases 20; train_val.prototxt lines 353, 357), the others at 1 (biases
2). Its solver: base_lr 0.001, divided by 10 every 20,000 of 100,000 iterations
(solver.prototxt lines 5-11) at batch 50 (train_val.prototxt line 17), on the 80,000
images of Flickr Style (examples/finetune_flickr_style/readme.md line 18): 5,000,000
images seen, 62.5 epochs, a decay every 12.5.

Here: `reinit=('fc8',)`, `lr_multipliers=(('fc8', 10.0),)` on top of
bias_lr_multiplier 2, no warm-up, and the length in epochs of the fine-tuning set
(`train_examples_per_class`, `classes`): 62.5 epochs, the 'step' schedule dividing by
10 at epochs 12.5, 25, 37.5 and 50, with a test after each 12.5. Neither the base's length nor its decay points
carry over (caffe_bvlc_alexnet's 450,000 steps are a from-scratch run's), so the steps
follow the data and the batch: 62.5 × (images // batch_size). The rate is Caffe's 0.001
at its batch of 50, scaled linearly to the base's batch (`lr_reference_batch` 50,
Goyal et al. 2017). `init_from` must be given (a training run's or an import_caffe
workdir); freeze the conv layers with
`--config.lr_multipliers="(('fc8', 10.0), ('conv[1-5]', 0.0))"`.
"""

import importlib

_CAFFE_BATCH = 50
_CAFFE_ITERATIONS = 100_000
_CAFFE_TRAIN_IMAGES = 80_000
EPOCHS = _CAFFE_ITERATIONS * _CAFFE_BATCH / _CAFFE_TRAIN_IMAGES  # 62.5.
DECAY_EPOCHS = (12.5, 25.0, 37.5, 50.0)  # stepsize 20,000 of max_iter 100,000.


def get_config(base: str = 'fashion_mnist'):
  """The fine-tuning recipe on `configs/<base>.py` (e.g. 'fashion_mnist', 'imagenet')."""
  config = importlib.import_module(f'configs.{base}').get_config()
  config.reinit = ('fc8',)
  config.lr_multipliers = (('fc8', 10.0),)
  config.learning_rate = 0.001
  config.lr_reference_batch = _CAFFE_BATCH
  config.lr_schedule = 'step'
  config.warmup_steps = 0
  config.num_train_steps = None
  config.num_epochs = EPOCHS
  config.lr_decay_steps = None
  config.lr_decay_epochs = DECAY_EPOCHS
  # One test per rate (Caffe's test_interval is 1,000 iterations, 1/20 of a rate's
  # span); a test every epoch of a small fine-tuning set would cost more than training.
  config.eval_every_steps = None
  config.eval_every_epochs = DECAY_EPOCHS[0]
  return config
