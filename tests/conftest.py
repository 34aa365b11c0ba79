"""Shared fixtures: tiny configs and a per-session TFDS data_dir."""
import os
import sys
import tempfile

import pytest

# One persistent XLA compilation cache for the session: its worker processes, the
# subprocesses (resume, multi-device) and the notebook kernels all compile the same tiny
# models. Only compiles over half a second are stored, so the small functions that
# latency_test counts always compile. Keys include the HLO, versions and XLA flags, so a
# developer-set JAX_COMPILATION_CACHE_DIR shared across runs stays correct.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:  # set once, by the first process
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='fiancee_jax_xla_')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
# The suite is compile-bound on CPU (tiny models, one-shot functions): XLA's backend
# optimisation passes took about 40 % of its time and buy nothing at these sizes. Tests check
# values, never speed (that is the benchmark's job, run without this flag). Subprocesses and
# notebook kernels inherit it; tests that set XLA_FLAGS append to it.
TEST_XLA_FLAGS = '--xla_backend_optimization_level=0'
if TEST_XLA_FLAGS not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from configs import landscapes  # noqa: E402


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """One TFDS data_dir for the whole session, so the tiny dataset is built once."""
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture
def tiny_config(data_dir):
  config = landscapes.get_config('tiny')
  with config.unlocked():
    config.data.data_dir = data_dir
  return config


def _run_tiny_job(tmp_path_factory, data_dir, config_module, name):
  """(workdir, config) of every stage of config_module's tiny variant on data_dir."""
  from fiancee_jax import pipeline  # pylint: disable=g-import-not-at-top
  config = config_module.get_config('tiny')
  with config.unlocked():
    config.data.data_dir = data_dir
  wd = str(tmp_path_factory.mktemp(name))
  pipeline.run(config, wd, 'backbone,database,exits,predictor,evaluate,benchmark')
  return wd, config


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory, data_dir):
  """(workdir, config) of the whole tiny job, run once per test session (~2-3 min).

  Tests that only read a trained workdir (pipeline contract, Colabs, inference) share it.
  """
  return _run_tiny_job(tmp_path_factory, data_dir, landscapes, 'tiny_run')


@pytest.fixture(scope='session')
def tiny_avatars_run(tmp_path_factory, data_dir):
  """(workdir, config) of the whole tiny reenactment job (avatars), run once per session."""
  from configs import avatars  # pylint: disable=g-import-not-at-top
  return _run_tiny_job(tmp_path_factory, data_dir, avatars, 'tiny_avatars_run')
