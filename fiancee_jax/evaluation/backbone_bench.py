"""Backbone throughput vs the machine's matmul peak, measured in one run.

  python -m fiancee_jax.evaluation.backbone_bench --config=configs/landscapes.py \
      --out=runs/backbone_bench.json

Compiles the generator forward (eval mode, random weights: speed does not depend on the
values) at config.train.batch_size ahead of time, reads XLA's FLOP count, times it after
warm-up and reports GFLOP/s beside a large `jnp.dot` timed in the same process.
"""
import json
import os

import jax
import ml_collections
from absl import app
from absl import flags
from ml_collections import config_flags

from fiancee_jax.metrics import latency
from fiancee_jax.models import factory


def run(config: ml_collections.ConfigDict, *, batch_size: int | None = None,
        iters: int = 10, matmul_n: int = 2048) -> dict:
  """{'backbone_gflop_per_s', 'matmul_gflop_per_s', 'ratio', ...} from one process."""
  b = batch_size or config.train.batch_size
  g = factory.make_generator(config)
  h, w = config.data.resolution
  labels = jax.random.randint(jax.random.key(1), (b, h, w), 0, config.data.num_classes)
  z = jax.random.normal(jax.random.key(2), (b, config.backbone.z_dim))
  variables = jax.jit(g.init)(jax.random.key(0), labels, z)
  compiled = latency.compile_aot(lambda v, l, z: g.apply(v, l, z), variables, labels, z)
  cost = latency.cost_and_memory(compiled)
  t = latency.time_compiled(compiled, variables, labels, z, warmup=3, iters=iters)
  mm = latency.matmul_gflops(n=matmul_n, iters=iters)
  gflop = cost['gflops']
  bb = gflop / (t['median_ms'] / 1e3)
  return {'batch_size': b, 'resolution': [h, w], 'gflops_per_batch': gflop,
          'median_ms': t['median_ms'], 'p90_ms': t['p90_ms'], 'iters': t['iters'],
          'backbone_gflop_per_s': bb, 'matmul_gflop_per_s': mm, 'ratio': bb / mm,
          'hardware': latency.hardware_string(), 'device': latency.device_info()}


def main(argv):
  del argv
  result = run(_CONFIG.value, iters=_ITERS.value)
  text = json.dumps(result, indent=2)
  print(text)
  if _OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, 'w') as f:
      f.write(text)


if __name__ == '__main__':
  # Flags are defined only when run as a script, so importing this module is side-effect free.
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
  _OUT = flags.DEFINE_string('out', '', 'Where to write the JSON (printed in any case).')
  _ITERS = flags.DEFINE_integer('iters', 10, 'Timed calls.')
  app.run(main)
