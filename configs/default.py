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
  # A subset of the dataset's label ids, relabelled 0..k-1 in this order, for train
  # and test (num_classes = k); () keeps every class as it is.
  config.classes = ()
  # The first N examples of each (kept) class of the train split; None: all.
  config.train_examples_per_class = ml_collections.config_dict.placeholder(int)
  config.cache = False  # Keep the encoded train split in memory.
  config.shuffle_buffer = 16_384
  # Exact, resumable data order; False lets tf.data reorder examples when that is faster.
  config.deterministic_input = True
  # Read the copy `python -m alexnet_jax.prepare` wrote of every split, rescaled once
  # (`resize` to resize_size², as the paper down-sampled ImageNet to 256 px, Sec. 2) and
  # stored as JPEG at `prepared_jpeg_quality` (95: cuda-convnet2's
  # make-data/pyext/include/pyext.h:26, JPEG_QUALITY) or as
  # raw uint8 pixels ('raw'); README, "Preparing ImageNet once".
  config.prepared = False
  config.prepared_format = 'jpeg'
  config.prepared_jpeg_quality = 95

  # Sec. 2 and 4.1: shorter side to 256, random 227×227 crops (224 in the text;
  # 227 makes conv1's arithmetic exact), flips, PCA lighting with σ = 0.1.
  config.image_size = 227
  config.resize_size = 256
  # 'shorter_side': the paper's rescale, then the central resize_size² patch;
  # 'square': warp to resize_size² (how Caffe's ImageNet LMDBs were made); 'pad':
  # warp to image_size² and pad with black to resize_size² (random translations).
  config.resize = 'shorter_side'
  config.augment = ml_collections.ConfigDict()
  config.augment.crop = 'paper'  # Or 'inception' (random-resized, as torchvision's recipe).
  config.augment.flip = True
  config.augment.pca_lighting_stddev = 0.1
  # Sec. 2: "subtracting the mean activity over the training set from each pixel";
  # per channel, 0-255 scale; std 1 keeps the paper's raw-pixel scale.
  config.pixel_mean = (123.68, 116.78, 103.94)
  config.pixel_std = (1.0, 1.0, 1.0)

  # Model (Sec. 3, 5): 'alexnet', the paper's two towers; 'alexnet_bn', You et al.
  # 2017's AlexNet-BN (BN in place of LRN); 'alexnet_owt', torchvision's one column
  # (Krizhevsky 2014; configs/torchvision_alexnet.py). README, "Models".
  config.model = 'alexnet'
  config.init = 'paper'  # N(0, 0.01), some biases 1; or 'he'.
  # Sec. 3.3's LRN with cuda-convnet2's arithmetic (alpha / n, k = 2, per tower;
  # cuda-convnet2 is the 2014 code release, not the paper's own code); or 'paper-text'
  # (Sec. 3.3 as printed: alpha itself, over all maps of the layer), 'caffe' (alpha /
  # n, k = 1, all maps). See models.LRN_CONVENTIONS.
  config.lrn = 'cuda-convnet'
  config.dropout_rate = 0.5
  config.dtype = 'float32'  # Compute dtype; parameters stay float32.

  # Transfer (README, "Fine-tuning"): a new run's parameters from the checkpoint of
  # another workdir (a training run or an import_caffe one), by layer name; layers
  # matching `reinit` (regexes on conv1...fc8), and fc8 when num_classes differs,
  # start from `init`. The source's FUNCTION_KEYS (config_lib: image_size, lrn, resize,
  # pixel mean/std) must match, except those named in `init_from_allowed_changes`.
  config.init_from = ml_collections.config_dict.placeholder(str)
  config.init_from_step = ml_collections.config_dict.placeholder(int)  # None: latest.
  config.reinit = ()
  config.init_from_allowed_changes = ()
  # Per-layer rate factors, ((regex on conv1...fc8, factor), ...), first match wins,
  # other layers 1; on top of bias_lr_multiplier. 0 freezes a layer: no update, no
  # weight decay, no momentum kept (Caffe's lr_mult 0).
  config.lr_multipliers = ()

  # Optimisation (Sec. 5): batch 128, momentum 0.9, weight decay 5e-4, lr 0.01
  # divided by 10 three times over ~90 epochs.
  config.batch_size = 128
  config.eval_batch_size = 250
  # Each step's batch_size examples in k micro-batches whose mean gradient makes one
  # update (Caffe's iter_size): the update of batch_size in the memory of
  # batch_size / k (README, "Large batches").
  config.grad_accum_steps = 1
  # The last evaluation of a run and --mode=eval: 1 = the central patch; 10 = the
  # paper's test (Sec. 4.1), softmax averaged over the four corner and central patches
  # and their reflections; 2 = the central patch and its reflection (the 10-crop test
  # when resize_size = image_size). Evaluations along the way take the central patch.
  config.eval_crops = 1
  config.learning_rate = 0.01
  # None: learning_rate as given; N: learning_rate × batch_size / N (Goyal et al. 2017's
  # linear scaling; README, "Large batches").
  config.lr_reference_batch = ml_collections.config_dict.placeholder(int)
  config.lr_schedule = 'step'  # 'step', 'cosine', 'polynomial' or 'constant'.
  config.lr_decay_epochs = (30, 60, 80)  # For 'step'; or lr_decay_steps.
  config.lr_decay_steps = ml_collections.config_dict.placeholder(tuple)
  config.lr_decay_factor = 0.1
  config.lr_poly_power = 2.0  # For 'polynomial': You et al. 2017 (LARS), power 2.
  # A linear warm-up from 0 before any schedule; or warmup_steps.
  config.warmup_epochs = 0.0
  config.warmup_steps = ml_collections.config_dict.placeholder(int)
  # 'sgd': the paper's update below; 'lars' (You et al. 2017) or 'lamb' (You et al.
  # 2019), layer-wise adaptive rates for large batches (alexnet_jax/optimizers.py);
  # momentum_form and bias_weight_decay are SGD's (LARS and LAMB never decay biases).
  config.optimizer = 'sgd'
  config.lars_trust_coefficient = 0.001  # LARS's eta (You et al. 2017, Sec. 3).
  # Sec. 5's update, v <- momentum * v - lr * (grad + weight_decay * w); w <- w + v,
  # or 'optax' (optax.sgd: v <- momentum * v + grad; w <- w - lr * v), which rescales
  # the whole momentum when the rate changes.
  config.momentum_form = 'paper'
  config.momentum = 0.9
  config.weight_decay = 5e-4
  # Biases: twice the weights' rate and no decay, as Caffe's bvlc_alexnet
  # (train_val.prototxt: lr_mult 2, decay_mult 0). Neither is the paper's ("an equal
  # learning rate for all layers", Sec. 5: set 1.0 and 5e-4 for that), nor quite
  # cuda-convnet2's: its layer-params-imagenet-2gpu-model.cfg gives biases their own
  # schedule (epsB=dexp[base=0.04;tgtFactor=25] vs epsW=dexp[base=0.02;tgtFactor=250],
  # lines 2-3: twice the rate at the start, 20x at the end) and no weight decay.
  config.bias_lr_multiplier = 2.0
  config.bias_weight_decay = 0.0
  # Durations (see alexnet_jax/config_lib.py): *_steps, when set, overrides *_epochs.
  config.num_epochs = 90.0  # A float: fractional epochs are fine (configs/finetune.py: 62.5).
  config.num_train_steps = ml_collections.config_dict.placeholder(int)

  # Devices (see alexnet_jax/sharding.py): 'model' = 2 puts the paper's two towers
  # on two devices, 1 keeps both on each; None: 2 if the device count is even.
  # 'data' None takes the remaining devices.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = ml_collections.config_dict.placeholder(int)
  config.mesh.model = ml_collections.config_dict.placeholder(int)

  # Bookkeeping periods, in steps or epochs (*_steps, when set, overrides *_epochs).
  config.seed = 0
  config.log_every_steps = 100
  config.log_every_epochs = ml_collections.config_dict.placeholder(float)
  config.eval_every_epochs = 1.0
  config.eval_every_steps = ml_collections.config_dict.placeholder(int)
  config.checkpoint_every_steps = 1000
  config.checkpoint_every_epochs = ml_collections.config_dict.placeholder(float)
  config.keep_checkpoints = 3
  return config
