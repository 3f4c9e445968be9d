"""Every knob, at the paper's values (Krizhevsky et al., 2012); other configs override a few."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # Data: a TFDS name, or 'image_folder' for <manual_dir>/<split>/<class>/<image>
  # (e.g. Imagenette: splits 'train' and 'val'); `manual_dir` holds the original files.
  config.dataset = 'imagenet2012'
  config.data_dir = ml_collections.config_dict.placeholder(str)  # None: TFDS default.
  config.manual_dir = ml_collections.config_dict.placeholder(str)
  config.train_split = 'train'
  config.test_split = 'validation'
  config.num_classes = 1000
  config.cache = False  # Keep the encoded train split in memory.
  config.shuffle_buffer = 16_384
  # Exact, resumable data order; False lets tf.data reorder examples when that is faster.
  config.deterministic_input = True

  # Sec. 2 and 4.1: shorter side to 256, random 227×227 crops (224 in the text;
  # 227 makes conv1's arithmetic exact), flips, PCA lighting with σ = 0.1.
  config.image_size = 227
  config.resize_size = 256
  config.augment = ml_collections.ConfigDict()
  config.augment.crop = 'paper'  # Or 'inception' (random-resized, as torchvision's recipe).
  config.augment.flip = True
  config.augment.pca_lighting_stddev = 0.1
  # Sec. 2: "subtracting the mean activity over the training set from each pixel";
  # per channel, 0-255 scale; std 1 keeps the paper's raw-pixel scale.
  config.pixel_mean = (123.68, 116.78, 103.94)
  config.pixel_std = (1.0, 1.0, 1.0)

  # Model (Sec. 3, 5).
  config.init = 'paper'  # N(0, 0.01), some biases 1; or 'he'.
  # Sec. 3.3's LRN as the code behind the paper computes it (alpha / n, k = 2, per
  # tower); or 'paper-text' (alpha as printed), 'caffe' (alpha / n, k = 1, all maps).
  config.lrn = 'cuda-convnet'
  config.dropout_rate = 0.5
  config.dtype = 'float32'  # Compute dtype; parameters stay float32.

  # Optimisation (Sec. 5): batch 128, momentum 0.9, weight decay 5e-4, lr 0.01
  # divided by 10 three times over ~90 epochs.
  config.batch_size = 128
  config.eval_batch_size = 250
  # `--mode=eval` only: 1 = the central patch; 10 = the paper's test (Sec. 4.1), softmax
  # averaged over the four corner and central patches and their reflections.
  config.eval_crops = 1
  config.learning_rate = 0.01
  config.lr_schedule = 'step'  # 'step', 'cosine' or 'constant'.
  config.lr_decay_epochs = (30, 60, 80)  # For 'step'.
  config.lr_decay_factor = 0.1
  config.warmup_steps = 0  # For 'cosine'.
  config.momentum = 0.9
  config.weight_decay = 5e-4
  config.num_epochs = 90
  config.num_train_steps = -1  # > 0 overrides num_epochs (smoke runs).

  # Devices (see alexnet_jax/sharding.py): 'model' = 2 puts the paper's two towers
  # on two devices, 1 keeps both on each; None: 2 if the device count is even.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # -1: all remaining devices.
  config.mesh.model = ml_collections.config_dict.placeholder(int)

  # Bookkeeping; periods in steps, <= 0 meaning once per epoch.
  config.seed = 0
  config.log_every_steps = 100
  config.eval_every_steps = -1
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  return config
