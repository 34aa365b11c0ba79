"""Input pipeline throughput: training examples/s with a thread and with worker processes.

  python -m fiancee_jax.evaluation.loader_benchmark --config=configs/oasis_ade20k.py \
      --out=DIR [--workers=0,1,2] [--batches=20]

Times `sources.train_batches` of the config's dataset (its `train` split, prepared first if
missing) at config.train.batch_size, for each number of worker processes in `--workers`
(`config.data.workers`; 0 loads on one host thread). Each setting is timed in the same
process, one after the other, after its warm-up batches (worker start-up excluded):
examples/s = batch size x timed batches / seconds. Writes DIR/loader.json and DIR/loader.md.

Nothing else runs while it measures: the numbers are what the loader alone delivers on the
machine's cores. Beside them, the same run measures how the machine's cores scale
(`cpu_scaling`): how much more a fixed pure-Python loop gets done in 2 processes at once than
in 1 (2.0 on two idle cores; less on a shared or throttled VM). It is a reference for reading
"2 workers vs 1", not a bound: decoding, which is most of a worker's time, scales otherwise.

The batches are what training consumes (decoded, flipped when config.data.flip, as stored:
uint8 images, which the compiled step converts to float32 on the devices), so a run's loader
keeps up when these examples/s exceed its training examples/s.
"""
import json
import multiprocessing
import os
import time
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import app
from absl import flags
from ml_collections import config_flags

from fiancee_jax.data import sources
from fiancee_jax.metrics import latency

FLAGS = flags.FLAGS



def time_loader(config: ml_collections.ConfigDict, *, workers: int, batches: int,
                seed: int = 0) -> dict[str, Any]:
  """Times `batches` training batches of config's train split with `workers` workers.

  Returns {'workers', 'batch_size', 'batches', 'seconds', 'examples_per_s',
  'first_batch_s'} (seconds: wall time of the timed batches, which follow 1 + 2 x workers
  untimed ones: every worker has started and delivered before the clock starts).
  """
  if batches < 1:
    raise ValueError(f'batches must be >= 1, got {batches}')
  if workers < 0:
    raise ValueError(f'workers must be >= 0, got {workers}')
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.workers = workers
  batch_size = config.train.batch_size
  source = sources.data_source(config, 'train')
  start = time.perf_counter()
  it = sources.train_batches(config, source, batch_size=batch_size, seed=seed,
                              convert=False)
  try:
    next(it)
    first = time.perf_counter() - start
    for _ in range(2 * workers):  # until every worker has delivered (and is warm)
      next(it)
    start = time.perf_counter()
    for _ in range(batches):
      next(it)
    seconds = time.perf_counter() - start
  finally:
    it.close()
  return {'workers': workers, 'batch_size': batch_size, 'batches': batches,
          'seconds': seconds, 'examples_per_s': batch_size * batches / seconds,
          'first_batch_s': first}


def _spin(n: int) -> None:
  total = 0
  for i in range(n):
    total += i


def cpu_scaling(processes: int = 2, loop: int = 20_000_000) -> float:
  """Throughput of `processes` spawned processes running a fixed loop at once, relative to
  one: processes x (time of one alone) / (time of all together). 2.0 = two independent cores."""
  ctx = multiprocessing.get_context('spawn')

  def timed(n: int) -> float:
    procs = [ctx.Process(target=_spin, args=(loop,)) for _ in range(n)]
    start = time.perf_counter()
    for p in procs:
      p.start()
    for p in procs:
      p.join()
    return time.perf_counter() - start

  timed(1)  # warm the spawn path
  return processes * timed(1) / timed(processes)


def run(config: ml_collections.ConfigDict, out: str, workers: Sequence[int],
        batches: int, scaling_loop: int = 20_000_000) -> dict[str, Any]:
  """Times every worker count; writes out/loader.json and out/loader.md; returns the json.

  scaling_loop: iterations of `cpu_scaling`'s loop (seconds of CPU at the default).
  """
  rows = [time_loader(config, workers=w, batches=batches) for w in workers]
  by_workers = {r['workers']: r['examples_per_s'] for r in rows}
  speedups = {f'{w}_vs_1': by_workers[w] / by_workers[1] for w in by_workers
              if w > 1 and 1 in by_workers}
  info = latency.device_info()
  result = {
      'dataset': config.data.name,
      'resolution': list(config.data.resolution),
      'flip': bool(config.data.flip),
      'hardware': latency.hardware_string(info),
      'cpu_count_usable': info['cpu_count_usable'],
      'cpu_scaling': {'processes': 2, 'vs_1': cpu_scaling(2, scaling_loop)},
      'rows': rows,
      'speedup': speedups,
  }
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'loader.json'), 'w') as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(out, 'loader.md'), 'w') as f:
    f.write(render_markdown(result))
  return result


def render_markdown(result: dict[str, Any]) -> str:
  """loader.json as a table."""
  h, w = result['resolution']
  lines = [f"Training batches of `{result['dataset']}` at {h}x{w} "
           f"(flip: {result['flip']}), {result['hardware']}.", '',
           '| workers | batch | examples/s | first batch (s) |', '|---|---|---|---|']
  for r in result['rows']:
    name = 'thread' if r['workers'] == 0 else str(r['workers'])
    lines.append(f"| {name} | {r['batch_size']} | {r['examples_per_s']:.1f} | "
                 f"{r['first_batch_s']:.2f} |")
  for key, value in result['speedup'].items():
    lines.append(f'\n{key.replace("_vs_", " workers vs ")}: {value:.2f}x')
  lines.append(f"\nFor reference, the cores' scaling in the same run: 2 processes of a "
               f"pure-Python loop get {result['cpu_scaling']['vs_1']:.2f}x the work of 1 done.")
  return '\n'.join(lines) + '\n'


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if FLAGS.config is None or FLAGS.out is None:
    raise app.UsageError('--config and --out are required')
  result = run(FLAGS.config, FLAGS.out, [int(w) for w in FLAGS.workers], FLAGS.batches)
  print(render_markdown(result))


if __name__ == '__main__':
  # Defined only when run as a program: importing the module (tests, other entry points that
  # also define --config) adds no flags.
  config_flags.DEFINE_config_file('config', None, 'Config file.')
  flags.DEFINE_string('out', None, 'Directory for loader.json and loader.md.')
  flags.DEFINE_list('workers', ['0', '1', '2'], 'Worker counts to time.')
  flags.DEFINE_integer('batches', 20, 'Timed batches per setting.')
  app.run(main)
