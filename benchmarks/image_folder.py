"""Image folders of real-photograph JPEGs (<root>/train/<class>/, <root>/val/<class>/) for
the input benchmarks: no dataset needed."""

import os

import matplotlib.cbook
import numpy as np
from PIL import Image


def write_image_folder(
  root: str, num_images: int, num_classes: int = 2, size: tuple[int, int] = (500, 375)
):
  """`num_images` JPEGs of `size` (width, height; 500×375 is the typical ILSVRC size,
  quality 90) in root/train/<class>/ and one per class in root/val/<class>/.

  Each is a different crop of a photograph (matplotlib's grace_hopper.jpg, 512×600),
  rescaled and sometimes mirrored: it decodes like an ImageNet JPEG, unlike noise or
  smooth gradients, and no two files are the same.
  """
  with matplotlib.cbook.get_sample_data('grace_hopper.jpg') as f:
    photo = Image.open(f).convert('RGB')
  rng = np.random.RandomState(0)
  width, height = photo.size
  for split, count in (('train', num_images), ('val', num_classes)):
    for i in range(count):
      folder = os.path.join(root, split, f'class{i % num_classes}')
      os.makedirs(folder, exist_ok=True)
      w = rng.randint(width // 2, width + 1)
      h = min(height, int(w * size[1] / size[0]))
      left, top = rng.randint(0, width - w + 1), rng.randint(0, height - h + 1)
      image = photo.crop((left, top, left + w, top + h)).resize(size, Image.BILINEAR)
      if rng.rand() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
      image.save(os.path.join(folder, f'{i}.jpg'), quality=90)
