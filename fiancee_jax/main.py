"""Entry point: python -m fiancee_jax.main --config=configs/landscapes.py --workdir=DIR.

Multi-process runs add --coordinator_address=HOST:PORT --num_processes=N --process_id=I to
the same command on every process (parallel.py).

A training stage stopped by a preemption notice (SIGTERM) saves its state and the process
exits with status 143 (128 + SIGTERM, as if the signal had ended it): the job is not done,
and the same command resumes it.
"""
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from fiancee_jax import config_checks
from fiancee_jax import parallel
from fiancee_jax import pipeline
from fiancee_jax.training import loop

PREEMPTED_EXIT_STATUS = 128 + 15

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               'configs', 'landscapes.py')
_CONFIG = config_flags.DEFINE_config_file(
    'config', _DEFAULT_CONFIG, 'Config file (ml_collections).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and reports go.',
                               required=True)
_STAGES = flags.DEFINE_string(
    'stages', ','.join(config_checks.KNOWN_STAGES),
    'Comma-separated stages to run (in pipeline order).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None,
    'Multi-process runs: HOST:PORT of process 0, which serves the coordinator there.')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Multi-process runs: number of processes (the same for all).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'Multi-process runs: this process, 0 .. num_processes - 1.')
_INIT_TIMEOUT = flags.DEFINE_integer(
    'initialization_timeout', parallel.DEFAULT_INITIALIZATION_TIMEOUT,
    'Multi-process runs: seconds to wait for every process to join before failing.')


def _run(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  try:
    launch = parallel.launch(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                             auto=bool(_CONFIG.value.get('distributed', False)),
                             timeout=_INIT_TIMEOUT.value)
    pipeline.run(_CONFIG.value, _WORKDIR.value, _STAGES.value, launch=launch)
  except (config_checks.ConfigError, parallel.LaunchError) as e:
    # Raised before any compute: the message is the whole story, a traceback adds nothing.
    raise SystemExit(f'FATAL: {e}') from None
  except loop.Preempted as e:
    logging.warning('%s', e)
    raise SystemExit(PREEMPTED_EXIT_STATUS) from None


def main() -> None:
  """The console script `fiancee-jax`: the same as `python -m fiancee_jax.main`."""
  app.run(_run)


if __name__ == '__main__':
  main()
