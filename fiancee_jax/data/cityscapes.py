"""Cityscapes as OASIS trains on it: the gtFine label ids, 35 classes, 256x512.

Label maps are the official labelIds (0..33; 0 = unlabelled), one-hot over 35 channels
as in OASIS (34 ids + its 'don't care' channel). Files (leftImg8bit_trainvaltest.zip and
gtFine_trainvaltest.zip from cityscapes-dataset.com, which needs a login), extracted
into the manual directory (`config.data.manual_dir`, default `data_dir/downloads/manual`):

  leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
  gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

The other gtFine files (color, instanceIds, polygons) are ignored. Images and label maps
pair by their `<city>_<seq>_<frame>` prefix, as in OASIS's CityscapesDataset.
"""
import os

from fiancee_jax.data import manual_tfds

NUM_CLASSES = 35
IMAGE_SUFFIX = '_leftImg8bit.png'
LABEL_SUFFIX = '_gtFine_labelIds.png'
# Official split -> its folder name.
_FOLDERS = {'train': 'train', 'validation': 'val'}


class CityscapesOasis(manual_tfds.ManualBuilder):
  """Cityscapes fine annotations (gtFine labelIds) and left 8-bit images."""

  NUM_CLASSES = NUM_CLASSES
  BUILDER_CONFIGS = [manual_tfds.ManualConfig(height=256, width=512)]
  LAYOUT = (f'leftImg8bit/{{train,val}}/<city>/*{IMAGE_SUFFIX} and '
            f'gtFine/{{train,val}}/<city>/*{LABEL_SUFFIX} (leftImg8bit_trainvaltest.zip and '
            'gtFine_trainvaltest.zip extracted) in config.data.manual_dir')

  @classmethod
  def list_pairs(cls, root: str, split: str) -> list[manual_tfds.Pair]:
    folder = _FOLDERS[split]
    found = {}
    for kind, suffix in (('leftImg8bit', IMAGE_SUFFIX), ('gtFine', LABEL_SUFFIX)):
      top = os.path.join(root, kind, folder)
      files = {}
      for city in manual_tfds.list_dir(top, '', layout=cls.LAYOUT):
        city_dir = os.path.join(top, city)
        if os.path.isdir(city_dir):
          for n in manual_tfds.list_dir(city_dir, suffix, layout=cls.LAYOUT):
            files[f'{city}/{n[:-len(suffix)]}'] = os.path.join(city_dir, n)
      found[kind] = files
    return manual_tfds.match_pairs(
        found['leftImg8bit'], found['gtFine'],
        what=f'{root}/{{leftImg8bit,gtFine}}/{folder}', layout=cls.LAYOUT)
