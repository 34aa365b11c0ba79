"""The Colabs run top to bottom in CI, and each stored .ipynb is jupytext of its paired .py.

The reviewed and linted source of each Colab is colabs/NAME.py (jupytext percent format); after
editing it, `jupytext --sync colabs/NAME.py` rewrites colabs/NAME.ipynb, outputs stripped.

Execution is what a user of a fresh runtime does: a new virtualenv holding only what a Colab
runtime brings (a Jupyter kernel, and the same jax and jaxlib this checkout tests with), a
kernel of that virtualenv, and both notebooks opened from the checkout and run top to bottom
with their parameter cells set (papermill style: WORKDIR and DATA_DIR into a temporary
directory). The demo's install cell installs the package from the checkout with its `colab`
extra (dependencies from the package index), then trains the tiny job; the latency notebook
then loads that job from the shared WORKDIR, as it does for a user who ran the demo first.
"""
import os
import re
import subprocess
import sys
import time
import types
from importlib import metadata

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
EXPECTED = {
    'fiancee_demo.ipynb': (('all stages done in', 'synthesis: 3 exits', 'compute saved',
                            'routed images/s', 'samples per exit'), 3),
    'compiled_exit_latency.ipynb': (('loading the finished job in', 'HLO lines',
                                     'cost_analysis of the switch', 'warm-up:',
                                     'vmap of lax.switch'), 4),
}


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


def _pip(python: str, *args: str) -> None:
  subprocess.run([python, '-m', 'pip', 'install', '-q', '--disable-pip-version-check', *args],
                 check=True)


@pytest.fixture(scope='module')
def fresh_runtime(tmp_path_factory):
  """(python of a new virtualenv with a kernel, jax and jaxlib only; its KernelSpecManager)."""
  root = tmp_path_factory.mktemp('runtime')
  venv = root / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True)
  python = str(venv / 'bin' / 'python')
  _pip(python, f"ipykernel=={metadata.version('ipykernel')}",
       f"jax=={metadata.version('jax')}", f"jaxlib=={metadata.version('jaxlib')}")
  subprocess.run([python, '-m', 'ipykernel', 'install', '--prefix', str(root / 'jupyter'),
                  '--name', 'python3'], check=True, capture_output=True)
  kernels = root / 'jupyter' / 'share' / 'jupyter' / 'kernels'
  return python, KernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=False)


def _set_parameters(nb, **values) -> None:
  """Rewrites `NAME = ...` lines of the parameter cell (as papermill injects parameters)."""
  cell = _code_cells(nb)[0]
  for name, value in values.items():
    cell.source, n = re.subn(rf'^{name} = .*$', f'{name} = {value!r}', cell.source, flags=re.M)
    assert n == 1, f'no {name} in the parameter cell'


def _package_version(python: str, name: str) -> str | None:
  # From the filesystem root: the checkout's own egg-info must not answer.
  out = subprocess.run([python, '-c', f'from importlib import metadata; '
                        f'print(metadata.version({name!r}))'], capture_output=True, text=True,
                       cwd=os.path.abspath(os.sep))
  return out.stdout.strip() if out.returncode == 0 else None


def test_notebooks_run_in_a_fresh_runtime_through_their_install_cell(fresh_runtime, tmp_path):
  python, kernel_specs = fresh_runtime
  assert _package_version(python, 'fiancee-jax') is None  # nothing installed yet
  jax_before = _package_version(python, 'jax')
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'VIRTUAL_ENV')}
  env.update(JAX_PLATFORMS='cpu', PATH=os.pathsep.join([os.path.dirname(python),
                                                        env.get('PATH', '')]))
  for name in NOTEBOOKS:
    nb = nbformat.read(os.path.join(COLABS, name), as_version=4)
    _set_parameters(nb, WORKDIR=str(tmp_path / 'job'), DATA_DIR=str(tmp_path / 'tfds'))
    km = KernelManager(kernel_name='python3', kernel_spec_manager=kernel_specs)
    assert km.kernel_spec.argv[0] == python
    client = NotebookClient(nb, km=km, timeout=900, allow_errors=False,
                            resources={'metadata': {'path': COLABS}})
    start = time.perf_counter()
    client.execute(env=env, cwd=COLABS)  # raises CellExecutionError naming the failing cell
    print(f'{name}: executed in {time.perf_counter() - start:.1f} s')

    text, pngs = _outputs_text(nb)
    markers, min_pngs = EXPECTED[name]
    for marker in markers:
      assert marker in text, f'{name}: no output mentions {marker!r}'
    assert pngs >= min_pngs, f'{name}: {pngs} figures, expected at least {min_pngs}'
    assert 'Traceback' not in text and 'restart the kernel' not in text
    for cell in _code_cells(nb):
      assert cell.execution_count is not None  # every cell ran
  # The demo's install cell installed the package; the runtime's jax stayed.
  assert _package_version(python, 'fiancee-jax') is not None
  assert _package_version(python, 'jax') == jax_before
