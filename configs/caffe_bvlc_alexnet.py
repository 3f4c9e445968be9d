"""BVLC Caffe's `bvlc_alexnet` as `alexnet_jax.import_caffe` loads it: network, input
preprocessing and (for reference) its training recipe.

Sources: BVLC/caffe models/bvlc_alexnet/{deploy,train_val}.prototxt and solver.prototxt;
its model card reports 57.1% top-1 / 80.2% top-5 on ILSVRC-2012 validation (central
227×227 crop of the 256×256 image). Differences from configs/imagenet.py (the paper):
* lrn 'caffe': alpha / n with k = 1, across all maps of the layer (one GPU).
* preprocessing: images warped to 256×256 (convert_imageset's resize, not the
  shorter side), 0-255 pixels minus Caffe's ILSVRC-2012 mean per channel (the
  per-channel averages of ilsvrc_2012_mean.binaryproto: B 104.00699, G 116.66877,
  R 122.67892); conv1's input channels are reordered on import, so images stay RGB.
* training recipe (solver.prototxt; train from scratch with it, not from the import):
  batch 256, lr 0.01 divided by 10 every 100,000 iterations, 450,000 iterations;
  random 227 crops and mirroring, no PCA lighting. Caffe's own init (train_val.prototxt:
  N(0, 0.01), N(0, 0.005) for fc6/fc7; biases 0 in conv1, conv3 and fc8, 0.1 in
  conv2, conv4, conv5, fc6 and fc7) is not reproduced: 'paper' init is used.
Needs the ImageNet tars in `--config.manual_dir` for evaluation (README, "Original
weights"); predict needs none.
"""

from alexnet_jax import import_caffe
from configs import imagenet


def get_config():
  config = imagenet.get_config()
  # lrn 'caffe', resize 'square' to 256, 227 crops, Caffe's mean (R, G, B), std 1.
  config.update(import_caffe.CAFFE_CONVENTIONS)
  config.augment.pca_lighting_stddev = 0.0
  config.batch_size = 256
  config.eval_batch_size = 250
  config.lr_decay_epochs = None
  config.lr_decay_steps = (100_000, 200_000, 300_000, 400_000)
  config.num_train_steps = 450_000
  return config
