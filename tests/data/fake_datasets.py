"""Small fake ADE20K and Cityscapes directories in the official layouts, for tests."""
import os

import numpy as np
from PIL import Image


def _pair(rng: np.random.Generator, size: tuple[int, int], num_classes: int
          ) -> tuple[np.ndarray, np.ndarray]:
  """(image uint8 [H, W, 3], label ids uint8 [H, W]): blocks of classes, a colour each."""
  h, w = size
  cells = rng.integers(0, num_classes, size=(4, 4))
  labels = np.kron(cells, np.ones((-(-h // 4), -(-w // 4)), np.int64))[:h, :w]
  palette = rng.integers(0, 256, size=(num_classes, 3))
  image = palette[labels] + rng.integers(-20, 21, size=(h, w, 3))
  return np.clip(image, 0, 255).astype(np.uint8), labels.astype(np.uint8)


def make_ade20k(root: str, *, num_train: int = 12, num_val: int = 4, size=(36, 40),
                seed: int = 0) -> str:
  """ADEChallengeData2016/{images,annotations}/{training,validation} under root.

  Returns the ADEChallengeData2016 folder. Images are JPEG, annotations single-channel PNG
  with ids in [0, 151).
  """
  rng = np.random.default_rng(seed)
  top = os.path.join(root, 'ADEChallengeData2016')
  for folder, n, tag in (('training', num_train, 'train'), ('validation', num_val, 'val')):
    for kind in ('images', 'annotations'):
      os.makedirs(os.path.join(top, kind, folder), exist_ok=True)
    for i in range(n):
      image, labels = _pair(rng, size, 151)
      stem = f'ADE_{tag}_{i + 1:08d}'
      Image.fromarray(image).save(os.path.join(top, 'images', folder, stem + '.jpg'),
                                  quality=95)
      Image.fromarray(labels).save(os.path.join(top, 'annotations', folder, stem + '.png'))
  return top


def make_cityscapes(root: str, *, cities: dict[str, dict[str, int]] | None = None,
                    size=(32, 64), seed: int = 0) -> str:
  """leftImg8bit/{train,val}/<city>/ and gtFine/{train,val}/<city>/ under root.

  `cities`: split -> {city: frames}. gtFine also gets the colour maps the builder ignores.
  Returns root.
  """
  cities = cities or {'train': {'aachen': 6, 'bochum': 6}, 'val': {'frankfurt': 4}}
  rng = np.random.default_rng(seed)
  for split, per_city in cities.items():
    for city, n in per_city.items():
      img_dir = os.path.join(root, 'leftImg8bit', split, city)
      gt_dir = os.path.join(root, 'gtFine', split, city)
      os.makedirs(img_dir, exist_ok=True)
      os.makedirs(gt_dir, exist_ok=True)
      for i in range(n):
        image, labels = _pair(rng, size, 34)
        stem = f'{city}_{i:06d}_000019'
        Image.fromarray(image).save(os.path.join(img_dir, stem + '_leftImg8bit.png'))
        Image.fromarray(labels).save(os.path.join(gt_dir, stem + '_gtFine_labelIds.png'))
        Image.fromarray(image).save(os.path.join(gt_dir, stem + '_gtFine_color.png'))
  return root
