"""scripts/colab_links.py: one repository URL for the notebooks' REPO_URL and the README badges."""
import importlib.util
import os
import shutil

import jupytext
import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    'colab_links', os.path.join(REPO, 'scripts', 'colab_links.py'))
colab_links = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(colab_links)


@pytest.fixture
def copy(tmp_path):
  shutil.copy(os.path.join(REPO, 'README.md'), tmp_path / 'README.md')
  shutil.copytree(os.path.join(REPO, 'colabs'), tmp_path / 'colabs')
  return str(tmp_path)


def test_the_checkout_is_consistent():
  colab_links.check(REPO)


def test_one_url_sets_notebooks_and_badges(copy):
  url = 'https://github.com/acme/fiancee-jax'
  colab_links.write(copy, url, 'release')
  assert colab_links.check(copy) == url
  readme = open(os.path.join(copy, 'README.md')).read()
  for name in colab_links.NOTEBOOKS:
    assert (f'https://colab.research.google.com/github/acme/fiancee-jax/blob/release/colabs/'
            f'{name}.ipynb') in readme
    # Each .ipynb is still the stripped jupytext pair of its .py, with the URL set.
    nb = nbformat.read(os.path.join(copy, 'colabs', f'{name}.ipynb'), as_version=4)
    paired = jupytext.read(os.path.join(copy, 'colabs', f'{name}.py'))
    assert [(c.cell_type, c.source) for c in nb.cells] == [
        (c.cell_type, c.source) for c in paired.cells]
    assert f"REPO_URL = '{url}'" in nb.cells[[c.cell_type for c in nb.cells].index('code')].source
    assert all(c.outputs == [] for c in nb.cells if c.cell_type == 'code')
  # Again with another URL: the block is replaced, not added.
  colab_links.write(copy, 'https://github.com/other/fork.git')
  readme = open(os.path.join(copy, 'README.md')).read()
  assert readme.count('<!-- colab -->') == 1 and 'acme' not in readme
  assert colab_links.check(copy) == 'https://github.com/other/fork.git'


def test_a_url_colab_cannot_open_is_refused_before_writing(copy):
  before = open(os.path.join(copy, 'README.md')).read()
  with pytest.raises(ValueError, match='Colab opens notebooks from GitHub'):
    colab_links.write(copy, 'https://gitlab.com/acme/fiancee-jax')
  assert open(os.path.join(copy, 'README.md')).read() == before


def test_disagreement_is_reported(copy):
  colab_links.write(copy, 'https://github.com/acme/fiancee-jax')
  path = os.path.join(copy, 'colabs', 'fiancee_demo.py')
  text = open(path).read().replace('acme', 'someone')
  open(path, 'w').write(text)
  with pytest.raises(ValueError, match='different repositories'):
    colab_links.check(copy)
