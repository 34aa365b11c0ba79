"""The embedded landscapes (`fiancee_jax.data.landscapes`) as a TFDS dataset.

`get_landscapes_source(split=...)` returns a random-access source: `len(source)` and
`source[i] -> {'labels': uint8 [H, W], 'image': uint8 [H, W, 3]}`, generated at the
config's resolution (no resizing), 12 classes. The dataset is built on first use (a few
seconds at 64x64) as `procedural_tfds` describes; record `i` of a split is generator
index `procedural_tfds.generator_index(split, i)`.
"""
import numpy as np
import tensorflow_datasets as tfds

from fiancee_jax.data import landscapes
from fiancee_jax.data import procedural_tfds


class Landscapes(procedural_tfds.ProceduralBuilder):
  """Embedded procedural landscapes (label map + image), array_record."""

  GENERATOR = landscapes
  VERSION = tfds.core.Version(landscapes.GENERATOR_VERSION)
  RELEASE_NOTES = {'1.0.0': 'First generator.'}
  BUILDER_CONFIGS = [procedural_tfds.ProceduralConfig(generator=landscapes)]  # 64x64
  SUPERVISED_KEYS = ('labels', 'image')

  def features(self, height: int, width: int) -> tfds.features.FeaturesDict:
    # Raw bytes: fast to write and read, no TF needed anywhere.
    return tfds.features.FeaturesDict({
        'labels': tfds.features.Tensor(shape=(height, width), dtype=np.uint8,
                                       encoding='bytes', doc='class ids into landscapes.CLASSES'),
        'image': tfds.features.Tensor(shape=(height, width, 3), dtype=np.uint8,
                                      encoding='bytes'),
    })


def get_landscapes_source(*, split: str, resolution: tuple[int, int] | int, seed: int,
                          num_train: int, num_validation: int, num_test: int,
                          data_dir: str) -> procedural_tfds.ProceduralSource:
  """A random-access source of one landscapes split (`procedural_tfds.get_source`).

  Returns:
    `source[i] -> {'labels': uint8 [H, W], 'image': uint8 [H, W, 3]}`.
  """
  return procedural_tfds.get_source(
      Landscapes, split=split, resolution=resolution, seed=seed, num_train=num_train,
      num_validation=num_validation, num_test=num_test, data_dir=data_dir)
