"""torchvision's AlexNet (`torchvision.models.alexnet`, config.model 'alexnet_owt') as
`alexnet_jax.import_torchvision` loads it: network, input preprocessing and its
training recipe.

Sources: torchvision/models/alexnet.py (the network; AlexNet_Weights.IMAGENET1K_V1:
56.522% top-1 / 79.066% top-5 on ILSVRC-2012 validation, one central 224 crop),
torchvision/transforms/_presets.py (ImageClassification: shorter side to 256,
bilinear and antialiased, centre crop 224, [0, 1] RGB normalised by the ImageNet
mean and std) and references/classification (README "AlexNet and VGG", train.py's
defaults, presets.py). Differences from configs/imagenet.py (the paper):
* the network: one column (Krizhevsky 2014), no LRN (config.lrn does not apply),
  64-192-384-256-256 maps, dropout before fc6 and fc7, a 6×6 adaptive average pool;
* the input: 224 px; pixels normalised by mean and std (here on the 0-255 scale:
  255 × (0.485, 0.456, 0.406) and 255 × (0.229, 0.224, 0.225));
* the recipe (train from scratch with it, not from the import): 8 GPUs × 32 =
  batch 256, SGD lr 0.01 (`--lr 1e-2`), momentum 0.9 as PyTorch's (v <- 0.9 v + g;
  momentum_form 'optax'), weight decay 1e-4 on every parameter, biases included,
  at the weights' rate; StepLR ×0.1 every 30 epochs, 90 epochs; random-resized 224
  crops ('inception') and flips, no PCA lighting. torchvision initialises with
  PyTorch's layer defaults (kaiming_uniform with a = √5: U(±1/√fan_in)), not
  reproduced: 'he' is used.
Needs the ImageNet tars in `--config.manual_dir` (README, "torchvision's AlexNet").
"""

from alexnet_jax import import_torchvision
from configs import imagenet


def get_config():
  config = imagenet.get_config()
  # model 'alexnet_owt', resize 'shorter_side' to 256, 224 crops, ImageNet mean and std.
  config.update(import_torchvision.TORCHVISION_CONVENTIONS)
  config.init = 'he'
  config.augment.crop = 'inception'
  config.augment.pca_lighting_stddev = 0.0
  config.batch_size = 256
  config.eval_batch_size = 250
  config.learning_rate = 0.01
  config.momentum = 0.9
  config.momentum_form = 'optax'
  config.weight_decay = 1e-4
  config.bias_weight_decay = 1e-4
  config.bias_lr_multiplier = 1.0
  config.lr_schedule = 'step'
  config.lr_decay_epochs = (30, 60)
  config.lr_decay_factor = 0.1
  config.num_epochs = 90
  return config
