"""ILSVRC-2012 as in the paper: 227 px, 1000 classes, batch 128, lr 0.01 (Sec. 5).

Needs the ImageNet tars in `--config.manual_dir` (see README, "Training on ImageNet").
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset = 'imagenet2012'
  config.manual_dir = '~/tensorflow_datasets/downloads/manual'
  return config
