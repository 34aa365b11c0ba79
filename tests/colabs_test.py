"""The Colabs run top to bottom in CI, and are stored as colabs/build_notebooks.py writes them.

Execution uses nbclient with a `python3` kernel of this very interpreter (a kernelspec written to
a temporary directory, so a fresh machine needs only `pip install -r requirements.txt -e .`).
The notebooks load the session's finished tiny job (`tiny_run` in conftest.py) through
FIANCEE_WORKDIR instead of training: the test shares the xdist worker that built it.
"""
import importlib.util
import os
import re
import sys
import time

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(REPO, 'colabs')
NOTEBOOKS = ('fiancee_demo.ipynb', 'compiled_exit_latency.ipynb')

# What each notebook must have shown: (text found in some output, minimum number of PNG figures).
EXPECTED = {
    ('fiancee_demo.ipynb', 'landscapes'): (('loading the finished job', 'compute saved',
                                            'routed images/s', 'samples per exit',
                                            'no ground truth'), 3),
    ('fiancee_demo.ipynb', 'avatars'): (('reenactment: 3 exits', 'compute saved',
                                         'routed images/s', 'samples per exit',
                                         'closer to the truth than copying the source'), 3),
    ('compiled_exit_latency.ipynb', 'landscapes'): (('HLO lines', 'cost_analysis of the switch',
                                                     'warm-up:', 'vmap of lax.switch'), 4),
}
_RUNS = {'landscapes': 'tiny_run', 'avatars': 'tiny_avatars_run'}


def _load_builder():
  spec = importlib.util.spec_from_file_location('build_notebooks',
                                                os.path.join(COLABS, 'build_notebooks.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _code_cells(nb):
  return [c for c in nb.cells if c.cell_type == 'code']


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_stored_notebook_is_generated_and_stripped(name):
  path = os.path.join(COLABS, name)
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  for i, cell in enumerate(_code_cells(nb)):
    assert cell.outputs == [], f'{name}: code cell {i} is stored with outputs; strip them'
    assert cell.execution_count is None, f'{name}: code cell {i} has an execution count'
  assert 'widgets' not in nb.metadata, f'{name} is stored with widget state'
  with open(path, encoding='utf-8') as f:
    stored = f.read()
  generated = nbformat.writes(_load_builder().notebooks()[name])
  assert stored.rstrip('\n') == generated.rstrip('\n'), (
      f'colabs/{name} differs from what colabs/build_notebooks.py writes; edit the builder and '
      'run `python colabs/build_notebooks.py`')


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_calls_only_public_api(name):
  nb = nbformat.read(os.path.join(COLABS, name), as_version=4)
  source = '\n'.join(c.source for c in _code_cells(nb))
  private = re.findall(r'\._[A-Za-z]\w*|import _\w+', source)
  assert not private, f'{name} uses private names {sorted(set(private))}'
  assert 'google.colab' in source and '!pip install' in source  # the Colab setup cell


@pytest.fixture(scope='module')
def kernel_spec_manager(tmp_path_factory):
  """A KernelSpecManager whose only `python3` kernel runs this interpreter."""
  from ipykernel import kernelspec  # pylint: disable=g-import-not-at-top
  prefix = str(tmp_path_factory.mktemp('jupyter'))
  path = kernelspec.install(kernel_name='python3', prefix=prefix)
  return KernelSpecManager(kernel_dirs=[os.path.dirname(path)], ensure_native_kernel=False)


def _outputs_text(nb) -> tuple[str, int]:
  texts, pngs = [], 0
  for cell in _code_cells(nb):
    for out in cell.outputs:
      if out.output_type == 'stream':
        texts.append(out.text)
      elif out.output_type in ('display_data', 'execute_result'):
        texts.append(out.data.get('text/markdown', '') + out.data.get('text/plain', ''))
        pngs += 'image/png' in out.data
  return '\n'.join(texts), pngs


@pytest.mark.parametrize('name, backbone', [
    pytest.param(n, b, marks=pytest.mark.xdist_group(_RUNS[b])) for n, b in EXPECTED])
def test_notebook_runs_top_to_bottom(name, backbone, request, kernel_spec_manager):
  workdir, config = request.getfixturevalue(_RUNS[backbone])
  nb = nbformat.read(os.path.join(COLABS, name), as_version=4)
  env = dict(os.environ, FIANCEE_WORKDIR=workdir, FIANCEE_DATA_DIR=config.data.data_dir,
             FIANCEE_CONFIG=backbone,
             PYTHONPATH=os.pathsep.join([REPO] + [p for p in [os.environ.get('PYTHONPATH')]
                                                  if p]),
             JAX_PLATFORMS='cpu')
  km = KernelManager(kernel_name='python3', kernel_spec_manager=kernel_spec_manager)
  assert km.kernel_spec.argv[0] == sys.executable
  client = NotebookClient(nb, km=km, timeout=600, allow_errors=False,
                          resources={'metadata': {'path': REPO}})
  start = time.perf_counter()
  client.execute(env=env, cwd=REPO)  # raises CellExecutionError naming the failing cell
  seconds = time.perf_counter() - start
  print(f'{name}: executed in {seconds:.1f} s')

  text, pngs = _outputs_text(nb)
  markers, min_pngs = EXPECTED[name, backbone]
  for marker in markers:
    assert marker in text, f'{name}: no output mentions {marker!r}'
  assert pngs >= min_pngs, f'{name}: {pngs} figures, expected at least {min_pngs}'
  assert 'Traceback' not in text
  for cell in _code_cells(nb):
    assert cell.execution_count is not None  # every cell ran
