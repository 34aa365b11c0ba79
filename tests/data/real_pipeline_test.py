"""End to end on the real-data path: every stage up to evaluate of the OASIS ADE20K and
Cityscapes configs (tiny widths) on fake directories in the official layouts."""
import json
import os

import numpy as np
import pytest

from configs import oasis_ade20k
from configs import oasis_cityscapes
from fiancee_jax import pipeline
from tests.data import fake_datasets

STAGES = 'backbone,database,exits,predictor,evaluate'


def _fake(name, root):
  if name == 'ade20k':
    return fake_datasets.make_ade20k(root, num_train=36, num_val=8)
  return fake_datasets.make_cityscapes(
      root, cities={'train': {'aachen': 18, 'bochum': 18}, 'val': {'lindau': 8}})


@pytest.mark.parametrize('module,name', [(oasis_ade20k, 'ade20k'),
                                         (oasis_cityscapes, 'cityscapes')])
def test_every_stage_runs_on_the_official_layout(tmp_path, module, name):
  config = module.get_config('tiny')
  with config.unlocked():
    config.data.update(data_dir=str(tmp_path / 'tfds'),
                       manual_dir=_fake(name, str(tmp_path / 'manual')))
    # The data path is under test, not the models: a 2-block backbone with one exit branch,
    # one exit variant, one predictor member and the l1 distance (fewer, smaller compiles).
    config.backbone.update(width_ratios=(4, 2, 1), d_width_ratios=(2,))
    config.exits.update(attach_after=(0,), branch_width_mults=(), branch_hidden_mults=(),
                        train_unguided=False)
    config.database.key_block = 0
    config.predictor.update(members=1, z_draws=1)
    config.distance.name = 'l1'
    config.evaluate.update(z_average=1, bootstrap_resamples=50)
  workdir = str(tmp_path / 'workdir')
  pipeline.run(config, workdir, STAGES)
  with open(os.path.join(workdir, 'report', 'report.json')) as f:
    report = json.load(f)
  # Every figure is on test = the official validation split (8 images).
  assert report['num_eval'] == 8
  assert report['resolution'] == list(config.data.resolution)
  assert len(report['exits']) == len(config.exits.attach_after)
  assert all(np.isfinite(e['mean_distance']) for e in report['exits'])
  assert report['routing'] and all(0.0 <= r['met_fraction'] <= 1.0 for r in report['routing'])
