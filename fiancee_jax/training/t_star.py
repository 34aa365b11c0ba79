"""t*, the headline quality bar, fixed right after the backbone stage (before any exit trains).

t* is read from the backbone alone (metrics/anchors.py): by default the mean distance between
the backbone's outputs on the first config.data.num_validation validation inputs (each with
its fixed z) and their sigma-1 Gaussian blur. It is written to WORKDIR/t_star.json, which
every later stage reads back unchanged, so no threshold is chosen after the exits are seen.
"""
import ml_collections
import numpy as np

from fiancee_jax import parallel
from fiancee_jax.metrics import anchors
from fiancee_jax.metrics import exit_distances
from fiancee_jax.models import factory
from fiancee_jax.training import artifact_io


def backbone_outputs(config: ml_collections.ConfigDict, variables, inputs: tuple[np.ndarray, ...],
                     batch: int) -> np.ndarray:
  """The backbone's outputs float32 [N, H, W, 3] on `inputs`, in chunks of `batch` split over
  every device (parallel.map_rows; call on every process)."""
  generator = factory.make_generator(config)
  return parallel.map_rows(generator.apply, inputs, batch, consts=variables)


def fix(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Fixes t* from the workdir's backbone artifact (a configured t* needs no backbone run);
  returns the record of WORKDIR/t_star.json."""
  def images() -> np.ndarray:
    backbone = artifact_io.load_backbone(config, workdir)
    inputs = exit_distances.load_inputs(config, 'validation', config.data.num_validation)
    return backbone_outputs(config, backbone.tree, inputs, config.predictor.measure_batch)

  return anchors.fix_t_star(config, workdir, images)
