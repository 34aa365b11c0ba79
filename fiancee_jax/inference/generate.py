"""`generate`: data -> images, each through the cheapest exit predicted to be good enough.

  out = generate(model, labels, threshold=0.1, seed=0)              # label maps (OASIS)
  out = generate(model, (source, driver), threshold=0.1)            # face reenactment
  out['images']           # float32 [B, H, W, 3] in [-1, 1]
  out['exit_ids']         # int32 [B]
  out['saved_fraction']   # 1 - mean GFLOPs / backbone GFLOPs

Routers hold compiled executables; the ones `generate` builds itself are kept on the model
(`model.routers`), so repeated calls compile nothing new (a new batch size compiles at most
the sampling of z) and the executables go when the model goes. Pass `router=` to control
bucket sizes or warm up ahead of time.
"""
from typing import Any

import jax
import numpy as np

from fiancee_jax import model as model_lib
from fiancee_jax.routing import router as router_lib


def _router(model: model_lib.FianceeModel, kind: str):
  """model.routers[kind], built on first use: 'switch' (batch of one) or 'bucketed'."""
  if kind not in model.routers:
    model.routers[kind] = (router_lib.SwitchRouter(model) if kind == 'switch'
                           else router_lib.BucketedRouter(model))
  return model.routers[kind]


def generate(model: model_lib.FianceeModel, data: Any, *, threshold: float, seed: int = 0,
             router: router_lib.BucketedRouter | None = None) -> dict[str, Any]:
  """Generates images with conditional early exits.

  Args:
    model: a trained FianceeModel with a predictor and calibrated margins.
    data: what the backbone consumes (model.task): int [B, H, W] label maps with class ids
      in [0, config.data.num_classes), or a (source, driver) pair of float32 [B, H, W, 3]
      images in [-1, 1].
    threshold: distance budget (in model.distance units, e.g. LPIPS 0.1): each sample takes
      the cheapest exit whose predicted distance plus its margin is <= threshold.
    seed: seed of the noise z (one z per image, as `model.make_inputs`); unused by
      noise-free backbones.
    router: a BucketedRouter for `model`; by default the model's own (a batch of one uses
      the model's SwitchRouter instead: one executable, only the taken exit runs).

  Returns:
    {'images': float32 [B, H, W, 3] in [-1, 1], 'exit_ids': int32 [B],
     'gflops': float64 [B] GFLOPs per sample (exit path + predictor, batch-1 costs),
     'mean_gflops': float, 'saved_fraction': float = 1 - mean_gflops / backbone GFLOPs}.

  Raises:
    ValueError: for a bad threshold or bad data (checked before any compute), a model
      without a predictor, or a router built for another model.
  """
  threshold = model_lib.check_threshold(threshold)
  seed = model_lib.check_seed(seed)
  data = model.check_data(data)
  if router is not None and router.model is not model:
    raise ValueError('router was built for a different FianceeModel; build it with '
                     'BucketedRouter(model) for this model, or pass router=None')
  if data[0].shape[0] == 0:
    raise ValueError(f'{model.task.data_keys[0]} is an empty batch; pass at least one sample')
  inputs = tuple(np.asarray(x) for x in model.make_inputs(data, jax.random.key(seed)))
  if router is None and data[0].shape[0] == 1:
    image, k = _router(model, 'switch')(inputs, threshold)
    images = np.asarray(image, np.float32)
    exit_ids = np.asarray(k, np.int32).reshape(1)
  else:
    router = router or _router(model, 'bucketed')
    images, exit_ids, _ = router(inputs, threshold)
  gflops = router_lib.sample_gflops(model, exit_ids)
  mean = float(np.mean(gflops))
  return {'images': images, 'exit_ids': exit_ids, 'gflops': gflops, 'mean_gflops': mean,
          'saved_fraction': 1.0 - mean / float(model.backbone_gflops)}
