"""Points the Colabs at a published repository: one URL for the notebooks and the README badges.

  python scripts/colab_links.py --repo_url=https://github.com/OWNER/NAME [--branch=main]

Sets `REPO_URL` in the Parameters cell of every notebook (colabs/NAME.py and its jupytext
pair colabs/NAME.ipynb) and writes "Open in Colab" badges for them between `<!-- colab -->`
and `<!-- /colab -->` in README.md, all from the one URL, so a badge opens the notebook of the
repository the notebook then clones. `check(root)` (run by the tests) verifies that the
notebooks and the README agree.
"""
import os
import re
from collections.abc import Sequence

import jupytext
from absl import app
from absl import flags

NOTEBOOKS = ('fiancee_demo', 'compiled_exit_latency')
_BADGE = 'https://colab.research.google.com/assets/colab-badge.svg'
_START, _END = '<!-- colab -->', '<!-- /colab -->'
_PARAM = re.compile(r"^REPO_URL = '([^']*)'(.*)$", re.M)
_GITHUB = re.compile(r'^https://github\.com/([\w.-]+)/([\w.-]+?)(?:\.git)?/?$')

_REPO_URL = flags.DEFINE_string('repo_url', None, 'https://github.com/OWNER/NAME')
_BRANCH = flags.DEFINE_string('branch', 'main', 'Branch the badges open.')


def colab_url(repo_url: str, branch: str, notebook: str) -> str:
  """The Colab address of colabs/NOTEBOOK.ipynb on `branch` of a GitHub repository."""
  m = _GITHUB.match(repo_url)
  if not m:
    raise ValueError(f'repo_url={repo_url!r}: Colab opens notebooks from GitHub; expected '
                     'https://github.com/OWNER/NAME')
  return (f'https://colab.research.google.com/github/{m.group(1)}/{m.group(2)}/blob/{branch}/'
          f'colabs/{notebook}.ipynb')


def badges(repo_url: str, branch: str) -> str:
  """The README block: one badge per notebook."""
  lines = [f'[![Open {name} in Colab]({_BADGE})]({colab_url(repo_url, branch, name)})'
           for name in NOTEBOOKS]
  return '\n'.join([_START, *lines, _END])


def _set_repo_url(source: str, repo_url: str) -> str:
  out, n = _PARAM.subn(lambda m: f"REPO_URL = {repo_url!r}{m.group(2)}", source, count=1)
  if n != 1:
    raise ValueError('no `REPO_URL = ...` line in the Parameters cell')
  return out


def write(root: str, repo_url: str, branch: str = 'main') -> None:
  """Sets REPO_URL in every notebook pair under root/colabs and the badges in README.md."""
  block = badges(repo_url, branch)  # validates the URL before anything is written
  for name in NOTEBOOKS:
    py = os.path.join(root, 'colabs', f'{name}.py')
    with open(py) as f:
      text = _set_repo_url(f.read(), repo_url)
    with open(py, 'w') as f:
      f.write(text)
    notebook = jupytext.reads(text, fmt='py:percent')
    jupytext.write(notebook, os.path.join(root, 'colabs', f'{name}.ipynb'), fmt='ipynb')
  readme = os.path.join(root, 'README.md')
  with open(readme) as f:
    text = f.read()
  if _START in text:
    head, rest = text.split(_START, 1)
    text = head + block + rest.split(_END, 1)[1]
  else:
    text = text.replace('## Colabs\n', f'## Colabs\n\n{block}\n', 1)
  with open(readme, 'w') as f:
    f.write(text)


def check(root: str) -> str:
  """The notebooks' common REPO_URL; ValueError if they or the README's badges disagree."""
  urls = set()
  for name in NOTEBOOKS:
    with open(os.path.join(root, 'colabs', f'{name}.py')) as f:
      m = _PARAM.search(f.read())
    if not m:
      raise ValueError(f'colabs/{name}.py has no REPO_URL parameter')
    urls.add(m.group(1))
  if len(urls) != 1:
    raise ValueError(f'the notebooks name different repositories: {sorted(urls)}')
  (url,) = urls
  with open(os.path.join(root, 'README.md')) as f:
    readme = f.read()
  links = re.findall(r'https://colab\.research\.google\.com/github/[^)\s]+', readme)
  if url and not links:
    raise ValueError(f'the notebooks clone {url} but README.md has no Colab badges; run '
                     f'scripts/colab_links.py --repo_url={url}')
  for link in links:
    if not url or not any(link.startswith(colab_url(url, '', n).split('/blob/')[0] + '/blob/')
                          for n in NOTEBOOKS):
      raise ValueError(f'README.md badge {link} does not open the repository the notebooks '
                       f'clone ({url or "none set"}); run scripts/colab_links.py')
  return url


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not _REPO_URL.value:
    raise app.UsageError('--repo_url is required')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  write(root, _REPO_URL.value, _BRANCH.value)
  print(f'notebooks and README badges point at {check(root)}')


if __name__ == '__main__':
  app.run(main)
