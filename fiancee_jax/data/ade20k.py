"""ADE20K as OASIS trains on it: the ADEChallengeData2016 scene-parsing maps.

151 classes: 0 = 'other' (unlabelled; OASIS's 'unknown'), 1..150 the SceneParsing
classes. Files (ADEChallengeData2016.zip, from the MIT Scene Parsing benchmark), extracted
into the manual directory (`config.data.manual_dir`, default `data_dir/downloads/manual`):

  ADEChallengeData2016/images/{training,validation}/ADE_*_<n>.jpg
  ADEChallengeData2016/annotations/{training,validation}/ADE_*_<n>.png  (one channel, 0..150)

`manual_dir` may be the ADEChallengeData2016 folder itself or its parent. Images and
annotations pair by file stem, as in OASIS's Ade20kDataset. (TFDS's own `scene_parse150`
holds the instance annotations of the Places challenge, not these maps.)
"""
import os

from fiancee_jax.data import manual_tfds

NUM_CLASSES = 151
FOLDER = 'ADEChallengeData2016'
# Official split -> the folder name under images/ and annotations/.
_FOLDERS = {'train': 'training', 'validation': 'validation'}


class Ade20kOasis(manual_tfds.ManualBuilder):
  """ADE20K scene parsing (ADEChallengeData2016), images and 151-class label maps."""

  NUM_CLASSES = NUM_CLASSES
  LAYOUT = (f'{FOLDER}/images/{{training,validation}}/*.jpg and '
            f'{FOLDER}/annotations/{{training,validation}}/*.png (the layout of '
            f'{FOLDER}.zip) in config.data.manual_dir')

  @classmethod
  def find_root(cls, manual_dir: str) -> str:
    inner = os.path.join(manual_dir, FOLDER)
    return inner if os.path.isdir(inner) else manual_dir

  @classmethod
  def list_pairs(cls, root: str, split: str) -> list[manual_tfds.Pair]:
    folder = _FOLDERS[split]
    dirs = {k: os.path.join(root, k, folder) for k in ('images', 'annotations')}
    found = {}
    for key, suffix in (('images', '.jpg'), ('annotations', '.png')):
      names = manual_tfds.list_dir(dirs[key], suffix, layout=cls.LAYOUT)
      found[key] = {os.path.splitext(n)[0]: os.path.join(dirs[key], n) for n in names}
    return manual_tfds.match_pairs(
        found['images'], found['annotations'],
        what=f'{dirs["images"]} and {dirs["annotations"]}', layout=cls.LAYOUT)
