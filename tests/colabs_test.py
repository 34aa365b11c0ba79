"""The Colabs run top to bottom in CI, and each stored .ipynb is jupytext of its paired .py.

The reviewed and linted source of each Colab is colabs/NAME.py (jupytext percent format); after
editing it, `jupytext --sync colabs/NAME.py` rewrites colabs/NAME.ipynb, outputs stripped.

Execution uses nbclient with a `python3` kernel of this very interpreter (a kernelspec written to
a temporary directory, so a fresh machine needs only `pip install -r requirements.txt -e .`).
The notebooks load the session's finished tiny job (`tiny_run` in conftest.py) through
FIANCEE_WORKDIR instead of training: the test shares the xdist worker that built it.
"""
import os
import re
import sys
import time
import types

import jupytext
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(REPO, 'colabs')
NOTEBOOKS = ('fiancee_demo.ipynb', 'compiled_exit_latency.ipynb')

# What each notebook must have shown: (text found in some output, minimum number of PNG figures).
# The demo runs on the reenactment job and the latency notebook on the landscapes job: every
# notebook runs in CI once, on the job whose xdist worker has room for it.
EXPECTED = {
    ('fiancee_demo.ipynb', 'avatars'): (('reenactment: 3 exits', 'compute saved',
                                         'routed images/s', 'samples per exit',
                                         'closer to the truth than copying the source'), 3),
    ('compiled_exit_latency.ipynb', 'landscapes'): (('HLO lines', 'cost_analysis of the switch',
                                                     'warm-up:', 'vmap of lax.switch'), 4),
}
_RUNS = {'landscapes': 'tiny_run', 'avatars': 'tiny_avatars_run'}


def _code_cells(nb):
  return [c for c in nb.cells if c.cell_type == 'code']


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_stored_notebook_is_jupytext_of_its_py_and_stripped(name):
  path = os.path.join(COLABS, name)
  py_path = path[:-len('.ipynb')] + '.py'
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  for i, cell in enumerate(_code_cells(nb)):
    assert cell.outputs == [], f'{name}: code cell {i} is stored with outputs; strip them'
    assert cell.execution_count is None, f'{name}: code cell {i} has an execution count'
  assert 'widgets' not in nb.metadata, f'{name} is stored with widget state'
  assert nb.metadata.get('jupytext', {}).get('formats') == 'ipynb,py:percent', (
      f'{name} is not paired with its .py (jupytext formats ipynb,py:percent)')
  paired = jupytext.read(py_path)
  stored = [(c.cell_type, c.source) for c in nb.cells]
  expected = [(c.cell_type, c.source) for c in paired.cells]
  assert stored == expected, (
      f'colabs/{name} differs from jupytext of {os.path.basename(py_path)}; edit the .py and run '
      f'`jupytext --sync {os.path.relpath(py_path, REPO)}`')


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_parameter_cell_comes_first(name):
  nb = nbformat.read(os.path.join(COLABS, name), as_version=4)
  first = _code_cells(nb)[0]
  assert 'parameters' in first.metadata.get('tags', []), f'{name}: untagged first code cell'
  assert re.search(r"^REPO_URL = .*# @param", first.source, re.M), (
      f'{name}: the first code cell does not hold the REPO_URL form field')


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_calls_only_public_api(name):
  nb = nbformat.read(os.path.join(COLABS, name), as_version=4)
  source = '\n'.join(c.source for c in _code_cells(nb))
  private = re.findall(r'\._[A-Za-z]\w*|import _\w+', source)
  assert not private, f'{name} uses private names {sorted(set(private))}'
  # The Colab setup: the package with its colab extra, never requirements.txt (whose pins would
  # replace the runtime's own jax and jaxlib).
  assert 'google.colab' in source and "'pip', 'install'" in source and "'.[colab]'" in source
  assert "'-r'" not in source


def _setup(name) -> str:
  """The parameter cell and the setup cell of a notebook, as one source."""
  nb = nbformat.read(os.path.join(COLABS, name), as_version=4)
  return '\n'.join(c.source for c in _code_cells(nb)[:2])


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_setup_uses_the_surrounding_checkout(name, monkeypatch):
  monkeypatch.setattr(sys, 'path', list(sys.path))
  monkeypatch.chdir(COLABS)  # where Jupyter starts a notebook opened from the checkout
  namespace = {}
  exec(_setup(name), namespace)  # pylint: disable=exec-used
  assert namespace['ROOT'] == REPO and os.getcwd() == REPO and sys.path[0] == REPO


@pytest.mark.parametrize('in_colab', [False, True])
def test_setup_outside_a_checkout_names_the_fix(in_colab, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  if in_colab:
    monkeypatch.setitem(sys.modules, 'google.colab', types.ModuleType('google.colab'))
  else:
    monkeypatch.delitem(sys.modules, 'google.colab', raising=False)
  error = ValueError if in_colab else RuntimeError
  with pytest.raises(error, match='REPO_URL' if in_colab else 'checkout'):
    exec(_setup(NOTEBOOKS[0]), {})  # pylint: disable=exec-used
  assert os.listdir(tmp_path) == []  # nothing cloned, nothing installed


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
