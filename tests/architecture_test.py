"""The layout of DESIGN.md section 2, read from the source: import direction, no cycles, imports
inside functions only for optional dependencies."""
import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       'fiancee_jax')

# Layers that never import the trainers, inference or evaluation.
LEAVES = ('models', 'guidance', 'routing', 'losses', 'metrics', 'data', 'ops')
# Imports allowed inside functions: optional dependencies only.
OPTIONAL = {'tensorboardX'}


def _modules() -> dict[str, ast.Module]:
  out = {}
  for root, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith('.py'):
        path = os.path.join(root, f)
        rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, '.')
        rel = rel.removesuffix('.__init__')
        with open(path) as fh:
          out[rel] = ast.parse(fh.read(), path)
  return out


def _imported(node: ast.AST) -> list[str]:
  if isinstance(node, ast.Import):
    return [a.name for a in node.names]
  if isinstance(node, ast.ImportFrom) and node.module:
    return [f'{node.module}.{a.name}' for a in node.names]
  return []


def _project_edges(modules: dict[str, ast.Module], *, top_level: bool) -> dict[str, set[str]]:
  edges = {}
  for name, tree in modules.items():
    nodes = tree.body if top_level else list(ast.walk(tree))
    targets = set()
    for node in nodes:
      for imp in _imported(node):
        while imp and imp not in modules:
          imp = imp.rpartition('.')[0]
        if imp and imp != name:
          targets.add(imp)
    edges[name] = targets
  return edges


MODULES = _modules()


def test_no_import_cycles():
  edges = _project_edges(MODULES, top_level=False)
  state: dict[str, int] = {}

  def visit(m, stack):
    state[m] = 1
    for n in sorted(edges[m]):
      if state.get(n) == 1:
        raise AssertionError(f'import cycle: {" -> ".join(stack + [m, n])}')
      if n not in state:
        visit(n, stack + [m])
    state[m] = 2

  for m in sorted(edges):
    if m not in state:
      visit(m, [])


@pytest.mark.parametrize('layer', LEAVES + ('inference', 'evaluation'))
def test_imports_point_one_way(layer):
  edges = _project_edges(MODULES, top_level=False)
  forbidden = ('fiancee_jax.training',)
  if layer in LEAVES:
    forbidden += ('fiancee_jax.inference', 'fiancee_jax.evaluation', 'fiancee_jax.pipeline')
  bad = sorted(f'{m} -> {t}' for m, ts in edges.items()
               if m.startswith(f'fiancee_jax.{layer}') for t in ts if t.startswith(forbidden))
  assert not bad, bad


def test_imports_inside_functions_are_optional_dependencies_only():
  bad = []
  for name, tree in MODULES.items():
    for fn in ast.walk(tree):
      if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        for node in ast.walk(fn):
          for imp in _imported(node):
            if imp.split('.')[0] not in OPTIONAL:
              bad.append(f'{name}.{fn.name}: {imp}')
  assert not bad, bad


def test_backbone_names_are_checked_in_few_places():
  """The backbone's name selects code in models/factory.py and the stage table only (and at
  most two other places)."""
  hits = []
  for name, tree in MODULES.items():
    if name in ('fiancee_jax.models.factory', 'fiancee_jax.pipeline'):
      continue
    for node in ast.walk(tree):
      if isinstance(node, ast.Compare):
        text = ast.unparse(node)
        if 'backbone.name' in text or "== 'reenact'" in text or "== 'oasis'" in text:
          hits.append(f'{name}: {text}')
  assert len(hits) <= 2, hits
