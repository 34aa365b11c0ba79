"""Multi-process runs: the whole pipeline on 2 processes gives the 1-process numbers exactly.

The tiny pipeline (backbone, database, exits, predictor, evaluate; the benchmark is a
per-host measurement, left out) runs as 2 processes x 1 CPU device, launched on 127.0.0.1
with --coordinator_address/--num_processes/--process_id, and as 1 process x 2 CPU devices:
the same global batches, split the same way over two devices, one per process or both in
one. Every report.json number, every leaf of every stage's artifact and every logged
training metric must be equal: tolerance zero.

Why zero, and why 2 x 1 against 1 x 2 rather than 2 x 2 against 1 x 4. Both runs compile
the same per-device programs on the same rows; they differ only in how the cross-device
reductions (gradient all-reduce, global batch-norm statistics, loss means) are carried out,
in-process or over gloo. A reduction over two devices is one addition, a + b, which IEEE
floats compute identically in either order, so the runs must agree bit for bit and any
difference is a bug (a process computing other rows, a shard put on the wrong device, a
process skipping a step). Over four devices the order of a 4-term float sum differs (one
process adds them in sequence, two processes add the pairs: measured), and that rounding
does not stay small: Adam turns it into +-lr steps of parameters whose exact gradient is
zero, and the database's k-means medoids, the top-k lookups and the routing decisions turn
those into discrete flips (measured on this config after 2 steps: backbone statistics 7e-4
apart, database values 1.5 apart, saved fractions 0.065 apart), so no tolerance short of
"anything" would hold.

Cost: three processes each compile the tiny models (about 35 s of XLA compilation and
20 s of tracing and imports per process on one CPU core), about 3 minutes of CPU in all.
The config is cut to one exit, a 2-block backbone, 2 steps per stage, the l1 distance and
one ensemble member; the dataset is the tiny one of the pytest session (data_dir), not rebuilt.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fiancee_jax import checkpoint
from fiancee_jax import metric_logging
from fiancee_jax import parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = 'backbone,database,exits,predictor,evaluate'
# landscapes:tiny, cut to what every stage still exercises: a guided exit (so the database
# stage builds one), the backbone trained, calibrated routing, anchors, intervals.
CHEAP = ('--config.distance.name=l1', '--config.backbone.width_ratios=(4,2,1)',
         '--config.backbone.d_width_ratios=(2,)', '--config.exits.attach_after=(0,)',
         '--config.exits.branch_width_mults=(0.5,)', '--config.exits.branch_hidden_mults=(0.125,)',
         '--config.exits.train_unguided=False', '--config.database.key_block=0',
         '--config.train.num_steps=2', '--config.train.ema_stats_batches=1',
         '--config.exits.num_steps=2', '--config.predictor.num_steps=2',
         '--config.predictor.members=1', '--config.predictor.num_train=16',
         '--config.predictor.z_draws=1', '--config.predictor.batch_size=8',
         '--config.router.num_eval=16', '--config.evaluate.z_average=1',
         '--config.evaluate.bootstrap_resamples=50')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
  return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu', XLA_FLAGS=flags.strip())


def _main(workdir: str, *flags: str, config: str = 'landscapes.py:tiny') -> list[str]:
  return [sys.executable, '-m', 'fiancee_jax.main', f'--config={REPO}/configs/{config}',
          f'--workdir={workdir}', *flags]


def _start(cmd: list[str], env: dict[str, str], log: str) -> subprocess.Popen:
  with open(log, 'w') as f:
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)


def _finish(procs: dict[str, subprocess.Popen], logs: dict[str, str], timeout: float) -> None:
  deadline = time.monotonic() + timeout
  try:
    for name, p in procs.items():
      p.wait(timeout=max(1.0, deadline - time.monotonic()))
  finally:
    for p in procs.values():
      if p.poll() is None:
        p.kill()
        p.wait()
  for name, p in procs.items():
    if p.returncode != 0:
      with open(logs[name]) as f:
        tail = f.read()[-4000:]
      pytest.fail(f'{name} exited with status {p.returncode}:\n{tail}')


def _flat(x, path=''):
  if isinstance(x, dict):
    for k, v in x.items():
      yield from _flat(v, f'{path}/{k}')
  elif isinstance(x, list):
    for i, v in enumerate(x):
      yield from _flat(v, f'{path}/{i}')
  else:
    yield path, x


def test_two_processes_give_the_one_process_numbers(tmp_path, data_dir):
  data = f'--config.data.data_dir={data_dir}'
  one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
  port = _free_port()
  logs = {name: str(tmp_path / f'{name}.log') for name in ('one', 'p0', 'p1')}
  # All three at once: the two processes wait on each other at every collective.
  procs = {'one': _start(_main(one, f'--stages={STAGES}', data, *CHEAP), _env(2), logs['one'])}
  for i in (0, 1):
    cmd = _main(two, f'--stages={STAGES}', data, *CHEAP,
                f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                f'--process_id={i}', '--initialization_timeout=120')
    procs[f'p{i}'] = _start(cmd, _env(1), logs[f'p{i}'])
  _finish(procs, logs, timeout=1200)
  with open(logs['p1']) as f:
    assert 'jax.distributed: joined as process 1 of 2' in f.read()

  reports = []
  for wd in (one, two):
    with open(os.path.join(wd, 'report', 'report.json')) as f:
      reports.append(dict(_flat(json.load(f))))
  assert reports[0].keys() == reports[1].keys()
  assert len(reports[0]) > 100
  differ = {k: (reports[0][k], reports[1][k]) for k in reports[0]
            if reports[0][k] != reports[1][k]}
  assert not differ, f'report.json numbers differ (1 process, 2 processes): {differ}'

  for kind in ('backbone', 'database', 'exits', 'predictor'):
    a, _ = checkpoint.load_pytree(os.path.join(one, 'artifacts', kind))
    b, _ = checkpoint.load_pytree(os.path.join(two, 'artifacts', kind))
    leaves_a = jax.tree_util.tree_flatten_with_path(a)[0]
    leaves_b = jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0, kind
    for (path, x), y in zip(leaves_a, leaves_b):
      np.testing.assert_array_equal(x, y, err_msg=f'{kind}{jax.tree_util.keystr(path)}')

  # Training metrics step by step; process 0 alone writes the logs (no line twice).
  metrics = [[{k: v for k, v in m.items() if k != 'time'}
              for m in metric_logging.read_metrics(wd)] for wd in (one, two)]
  assert metrics[0] and metrics[0] == metrics[1]
  with open(os.path.join(two, 'timings.jsonl')) as f:
    assert [json.loads(line)['stage'] for line in f] == STAGES.split(',')


@pytest.mark.parametrize('flags, match', [
    (dict(coordinator_address='127.0.0.1:1234', num_processes=2),
     r'--process_id missing: give --coordinator_address, --num_processes and --process_id'),
    (dict(process_id=0), '--coordinator_address, --num_processes missing'),
    (dict(coordinator_address='127.0.0.1:1234', num_processes=2, process_id=2),
     r'--process_id=2 must be in \[0, 2\)'),
    (dict(coordinator_address='127.0.0.1:1234', num_processes=2, process_id=-1),
     r'--process_id=-1 must be in \[0, 2\)'),
    (dict(coordinator_address='127.0.0.1:1234', num_processes=0, process_id=0),
     '--num_processes=0 must be >= 1'),
    (dict(coordinator_address='127.0.0.1', num_processes=2, process_id=0),
     "--coordinator_address='127.0.0.1' must be HOST:PORT"),
    (dict(coordinator_address='host:99999', num_processes=2, process_id=0),
     'must be HOST:PORT'),
    (dict(timeout=0), '--initialization_timeout=0 must be a positive number'),
])
def test_bad_launch_flags_are_refused_before_anything_starts(flags, match):
  with pytest.raises(parallel.LaunchError, match=match):
    parallel.launch(**flags)


def test_launch_flags_and_the_reasons_a_join_fails():
  assert not parallel.launch().explicit
  assert parallel.launch(auto=True).auto
  spec = parallel.launch('10.0.0.1:1234', 4, 3, timeout=7)
  assert spec.explicit and spec.timeout == 7
  assert ('process 3: no coordinator answers at 10.0.0.1:1234 (--coordinator_address) after '
          '7 s (--initialization_timeout)') in parallel.join_failure(spec, False)
  waiting = parallel.join_failure(spec, True)
  assert 'not all 4 processes (--num_processes) joined' in waiting
  assert 'its own --process_id in [0, 4)' in waiting
  assert 'not all 4 processes' in parallel.join_failure(parallel.launch('h:1', 4, 0), False)
  assert 'cluster auto-detection' in parallel.join_failure(parallel.launch(auto=True), False)
  parallel.initialize(parallel.launch())  # one process: nothing to join, nothing raised
  parallel.initialize(parallel.launch('127.0.0.1:1', 1, 0))


def test_bad_launches_fail_within_the_timeout_naming_the_flag(tmp_path):
  """A missing coordinator: the process says so after --initialization_timeout=3 s (the
  runtime alone would abort after 2 x 3 + 30 s with a bare DEADLINE_EXCEEDED). Processes
  given different --num_processes: both refuse at once. Nothing is computed in either case.
  """
  lonely, pair = _free_port(), _free_port()
  logs = {name: str(tmp_path / f'{name}.log') for name in ('lonely', 'p0', 'p1')}
  start = time.monotonic()
  procs = {'lonely': _start(_main(str(tmp_path / 'a'), f'--coordinator_address=127.0.0.1:{lonely}',
                                  '--num_processes=2', '--process_id=1',
                                  '--initialization_timeout=3'), _env(1), logs['lonely'])}
  for i, n in ((0, 2), (1, 3)):
    procs[f'p{i}'] = _start(_main(str(tmp_path / 'b'), f'--coordinator_address=127.0.0.1:{pair}',
                                  f'--num_processes={n}', f'--process_id={i}',
                                  '--initialization_timeout=60'), _env(1), logs[f'p{i}'])
  for p in procs.values():
    p.wait(timeout=300)
  elapsed = time.monotonic() - start
  out = {}
  for name, path in logs.items():
    with open(path) as f:
      out[name] = f.read()
    assert procs[name].returncode == 1, (name, out[name][-3000:])
  assert (f'FATAL: process 1: no coordinator answers at 127.0.0.1:{lonely} '
          '(--coordinator_address) after 3 s') in out['lonely']
  for name, other, mine, theirs in (('p0', 1, 2, 3), ('p1', 0, 3, 2)):
    assert (f'process {other} was started with --num_processes={theirs}, this process '
            f'({name[1]}) with --num_processes={mine}: give every process the same '
            '--num_processes') in out[name], out[name][-3000:]
  # Start-up (imports, config checks) of 3 processes on 2 busy cores, plus the 3 s: well
  # inside the 60 s the pair was given and the 36 s after which the runtime would abort.
  assert elapsed < 60, elapsed
  for wd in ('a', 'b'):
    assert not os.path.exists(tmp_path / wd / 'checkpoints'), wd


def _checkpoint_steps(workdir: str) -> list[int]:
  d = os.path.join(workdir, 'checkpoints', 'backbone')
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


@pytest.mark.slow
def test_a_preemption_notice_stops_every_process_at_one_step_and_they_resume(tmp_path,
                                                                             data_dir):
  """SIGTERM to one of two processes: JAX's preemption service tells both, both save the same
  step and exit with status 143; relaunched, they end with the parameters of an
  uninterrupted 1-process x 2-device run, bit for bit."""
  flags = (f'--config.data.data_dir={data_dir}', '--stages=backbone', *CHEAP,
           '--config.train.num_steps=60', '--config.train.checkpoint_every=4',
           '--config.train.log_every=4', '--config.train.sample_every=100')
  one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
  logs = {name: str(tmp_path / f'{name}.log') for name in ('one', 'p0', 'p1', 'r0', 'r1')}

  def pair(prefix):
    port = _free_port()
    return {f'{prefix}{i}': _start(
        _main(two, *flags, f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
              f'--process_id={i}', '--initialization_timeout=120'), _env(1),
        logs[f'{prefix}{i}']) for i in (0, 1)}

  reference = {'one': _start(_main(one, *flags), _env(2), logs['one'])}
  procs = pair('p')
  deadline = time.monotonic() + 600
  while not _checkpoint_steps(two) and time.monotonic() < deadline:
    assert all(p.poll() is None for p in procs.values()), 'a process ended before its first save'
    time.sleep(0.05)
  procs['p1'].send_signal(signal.SIGTERM)
  for name, p in procs.items():
    assert p.wait(timeout=300) == 143, open(logs[name]).read()[-3000:]
  stopped = _checkpoint_steps(two)[-1]
  assert stopped < 60
  for name in ('p0', 'p1'):
    with open(logs[name]) as f:
      assert f"its state at step {stopped} is saved" in f.read(), name
  _finish(pair('r'), logs, timeout=900)
  _finish(reference, logs, timeout=900)
  with open(logs['r0']) as f:
    assert f'resumed at step {stopped}' in f.read()
  a, _ = checkpoint.load_pytree(os.path.join(one, 'artifacts', 'backbone'))
  b, _ = checkpoint.load_pytree(os.path.join(two, 'artifacts', 'backbone'))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
