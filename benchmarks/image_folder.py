"""Generated JPEG image folders (<root>/train/<class>/, <root>/val/<class>/) for the
input benchmarks: no dataset needed."""

import os

import numpy as np
from PIL import Image


def write_image_folder(
  root: str, num_images: int, num_classes: int = 2, size: tuple[int, int] = (500, 375)
):
  """`num_images` random JPEGs of `size` (width, height; 500×375 is the typical ILSVRC
  size) in root/train/<class>/ and one per class in root/val/<class>/."""
  rng = np.random.RandomState(0)
  for split, count in (('train', num_images), ('val', num_classes)):
    for i in range(count):
      folder = os.path.join(root, split, f'class{i % num_classes}')
      os.makedirs(folder, exist_ok=True)
      # Smooth noise compresses like a photo, unlike white noise.
      small = rng.randint(0, 256, (24, 32, 3), np.uint8)
      Image.fromarray(small).resize(size, Image.BILINEAR).save(
        os.path.join(folder, f'{i}.jpg'), quality=90
      )
