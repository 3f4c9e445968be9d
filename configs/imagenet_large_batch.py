"""You, Gitman & Ginsburg 2017's large-batch ImageNet recipe: AlexNet-BN, LARS, batch 8K.

"Large Batch Training of Convolutional Networks" (arXiv:1708.03888) reports 60.1% top-1
for AlexNet-BN + LARS at batch 8K in 100 epochs (README, "Large batches"). The numbers
below are those of the authors' own solver for that run, NVIDIA/caffe
models/alexnet_bn/solver_8K.prototxt (it trains train_val2_fp16.prototxt, the network
of `models.AlexNetBN`): batch 8192, 100 epochs (max_iter 15600), base_lr 10 with
larc_eta 0.001, a ramp-up over the first 600 iterations, lr_policy "poly" with power 2,
momentum 0.9, weight_decay 5e-4; no lr_mult on the biases (`bias_lr_multiplier` 1).

Two differences remain, so the rate is a starting point for a sweep, not a copy: the
solver's LARC uses larc_policy "clip", each layer's rate min(lr, η‖w‖/‖g‖)
(src/caffe/solvers/sgd_solver.cpp), where `optax.lars` scales, lr · η‖w‖/‖g + wd·w‖
(the paper's Algorithm 1); and its ramp starts at rampup_lr 1 where the warm-up here
starts at 0. The layers start from `config.init` ('paper'), not the prototxt's fillers.

The batch of 8192 is one update over all devices, taken in 16 micro-batches
(`grad_accum_steps`, Caffe's iter_size) so that 2 GPUs hold 256 rows each at a time and
8 (mesh.data=4) 128; AlexNet-BN then normalises by each micro-batch's statistics (512
images over all devices). Needs the ImageNet tars, as configs/imagenet.py.
"""

from configs import imagenet

# ILSVRC-2012's train split, for the solver's iterations in epochs.
IMAGENET_TRAIN_EXAMPLES = 1_281_167


def get_config():
  config = imagenet.get_config()
  config.model = 'alexnet_bn'
  config.batch_size = 8192
  config.grad_accum_steps = 16
  config.optimizer = 'lars'
  config.lars_trust_coefficient = 0.001
  config.learning_rate = 10.0
  config.lr_schedule = 'polynomial'
  config.lr_poly_power = 2.0
  config.warmup_epochs = 600 * 8192 / IMAGENET_TRAIN_EXAMPLES  # rampup_interval: 600.
  config.num_epochs = 100
  config.momentum = 0.9
  config.weight_decay = 5e-4
  config.bias_lr_multiplier = 1.0
  config.eval_batch_size = 256  # Splits over 1, 2, 4 or 8 devices.
  return config
