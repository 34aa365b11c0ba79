"""Exported exits: a trained model's exit paths and batch-1 router as `jax.export` artifacts.

  python -m fiancee_jax.export --workdir=runs/demo --out=runs/demo/exported \
      [--buckets=1,2,4,8] [--platforms=cpu,cuda,tpu] [--thresholds=0.05,0.1] [--variant=...]

  exported = export.load('runs/demo/exported')        # jax + numpy + these files only
  images = exported.exits[(k, b)](labels, z)          # exit k at bucket b: [b, H, W, 3]
  image, k = exported.switch(labels, z, threshold=0.1)  # batch 1: predictor -> lax.switch

Directory layout (every file's sha256 is in the manifest and checked by `load`):

  manifest.json            what each artifact is: exit id, bucket, input and output shapes and
                           dtypes, GFLOPs, the model's fingerprints, platforms, format version
  params.npz               the exit paths' weights: leaves of model.params, in flatten order
  predictor_params.npz     the predictor's weights (the switch router's second argument)
  exit{k}_b{b}.jax_export  exit k's path at batch b: (params leaves, *inputs) -> images
  switch_b1.jax_export     (params leaves, predictor leaves, margins f32 [E - 1], threshold
                           f32 [], *inputs at batch 1) -> (image [1, H, W, 3], exit id i32 [])

Weights are arguments, not constants baked into the modules: every (exit, bucket) of a
model shares one copy on disk and in device memory (baked in, E x buckets copies), and the
modules stay small. The directory, not one file, is the self-contained unit.

Exporting for platforms without their devices works (`--platforms=cpu,cuda,tpu` on a CPU
machine); by default the artifacts target the backend JAX runs on, as `jax.export` does.
Routing margins: a model calibrated with one margin set (config.router.calibration other than
'risk_control') stores it; threshold-dependent margins are stored for `thresholds` given at
export, and other thresholds need `margins=` (model.margins_at(threshold)).
"""
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import app
from absl import flags
from jax import export as jax_export

from fiancee_jax import artifacts
from fiancee_jax import model as model_lib
from fiancee_jax import tasks
from fiancee_jax.inference import loading
from fiancee_jax.metrics import flops as flops_lib
from fiancee_jax.routing import router as router_lib

FORMAT = 'fiancee-jax-export'
FORMAT_VERSION = 1
MANIFEST = 'manifest.json'
PARAMS = 'params.npz'
PREDICTOR_PARAMS = 'predictor_params.npz'


class ExportError(ValueError):
  """An export directory is missing files, damaged, of another format, or of another model."""


class ExportedModel(NamedTuple):
  """What `load` returns.

  Attributes:
    manifest: the directory's manifest.json.
    exits: {(exit id, bucket): fn(*inputs at that batch) -> images float32 [b, H, W, 3]}.
    switch: fn(*inputs at batch 1, threshold, margins=None) -> (image float32 [1, H, W, 3],
      exit id int32 []); None when the model had no predictor.
  """
  manifest: dict[str, Any]
  exits: dict[tuple[int, int], Callable[..., jax.Array]]
  switch: Callable[..., tuple[jax.Array, jax.Array]] | None


def _spec(x: Any) -> dict[str, Any]:
  return {'shape': [int(d) for d in np.shape(x)], 'dtype': np.dtype(x.dtype).name}


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def _margins_json(m: np.ndarray) -> list[float | None]:
  """float32 [E - 1] -> JSON list; +inf (exit never taken) becomes None."""
  return [None if np.isinf(v) else float(v) for v in np.asarray(m, np.float32)]


def _margins_array(m: Sequence[float | None]) -> np.ndarray:
  return np.array([np.inf if v is None else v for v in m], np.float32)


def weights_digest(model: model_lib.FianceeModel) -> str:
  """sha256 over the exit paths' and the predictor's weights (artifacts.tree_digest)."""
  return artifacts.tree_digest({'params': model.params, 'predictor': model.predictor_params})


def _save_leaves(path: str, tree: Any) -> list[jax.Array]:
  leaves = jax.tree.leaves(tree)
  np.savez(path, **{f'leaf_{i:05d}': np.asarray(jax.device_get(x))
                    for i, x in enumerate(leaves)})
  return leaves


def _write(out_dir: str, name: str, exported: jax_export.Exported) -> None:
  with open(os.path.join(out_dir, name), 'wb') as f:
    f.write(exported.serialize())


def export_model(model: model_lib.FianceeModel, out_dir: str, *,
                 buckets: Sequence[int] | None = None,
                 platforms: Sequence[str] | None = None,
                 thresholds: Sequence[float] = ()) -> dict[str, Any]:
  """Writes every exit path per bucket and the batch-1 switch router as `jax.export` artifacts.

  Args:
    model: a FianceeModel (usually `fiancee_jax.load_model(workdir)`).
    out_dir: directory to write (created; an earlier export's files are overwritten, its
      manifest removed first).
    buckets: batch sizes to export every exit at; None: router.default_buckets(), the sizes
      `generate`'s bucketed router runs.
    platforms: jax.export platforms ('cpu', 'cuda', 'rocm', 'tpu'); None: the backend JAX
      runs on.
    thresholds: distances whose routing margins are stored for the switch router (needed
      when the margins depend on the threshold, config.router.calibration='risk_control').

  Returns:
    The manifest written to out_dir/manifest.json.

  Raises:
    ValueError: bad buckets, platforms or thresholds (before anything is lowered).
  """
  sizes = tuple(int(b) for b in (router_lib.default_buckets() if buckets is None else buckets))
  if not sizes or min(sizes) < 1 or len(set(sizes)) != len(sizes):
    raise ValueError(f'buckets must be distinct positive batch sizes, got {tuple(buckets)}')
  platforms = tuple(platforms or (jax.default_backend(),))
  known = ('cpu', 'cuda', 'rocm', 'tpu')
  if any(p not in known for p in platforms):
    raise ValueError(f'platforms {platforms} must be among {known} (e.g. --platforms=cpu,cuda)')
  thresholds = [model_lib.check_threshold(t) for t in thresholds]
  os.makedirs(out_dir, exist_ok=True)
  # The manifest goes last: an export stopped half-way has none, and `load` says so.
  if os.path.exists(os.path.join(out_dir, MANIFEST)):
    os.remove(os.path.join(out_dir, MANIFEST))

  def lower(fn, *args):
    return jax_export.export(jax.jit(fn), platforms=platforms)(*flops_lib.abstract(args))

  leaves = _save_leaves(os.path.join(out_dir, PARAMS), model.params)
  treedef = jax.tree.structure(model.params)
  names = model.task.data_keys + (('z',) if model.task.noise_dim else ())
  entries = []
  for k, path in enumerate(model.paths()):
    def run(params_leaves, *inputs, path=path):
      return path(jax.tree.unflatten(treedef, params_leaves), *inputs)
    for b in sizes:
      specs = tasks.input_specs(model.task, b)
      exp = lower(run, leaves, *specs)
      name = f'exit{k}_b{b}.jax_export'
      _write(out_dir, name, exp)
      entries.append({'kind': 'exit', 'exit': k, 'batch': b, 'file': name,
                      'is_backbone': k == model.num_exits - 1,
                      'gflops_per_image': float(model.exit_gflops[k]),
                      'inputs': [dict(name=n, **_spec(s)) for n, s in zip(names, specs)],
                      'outputs': [_spec(a) for a in exp.out_avals]})

  pleaves = []
  margins = None if model.risk_control is not None else _margins_json(model.margins)
  if model.predictor is not None:
    pleaves = _save_leaves(os.path.join(out_dir, PREDICTOR_PARAMS), model.predictor_params)
    ptreedef = jax.tree.structure(model.predictor_params)
    paths, predict = model.paths(), model.predict_fn()

    def routed(params_leaves, predictor_leaves, margins, threshold, *inputs):
      params = jax.tree.unflatten(treedef, params_leaves)
      pred = predict(jax.tree.unflatten(ptreedef, predictor_leaves), *inputs)  # [1, E - 1]
      k = router_lib.route(pred, threshold, margins)[0]  # scalar: a conditional, not a select
      return jax.lax.switch(k, paths, params, *inputs), k

    specs = tasks.input_specs(model.task, 1)
    exp = lower(routed, leaves, pleaves,
                jax.ShapeDtypeStruct((model.num_exits - 1,), np.float32),
                jax.ShapeDtypeStruct((), np.float32), *specs)
    _write(out_dir, 'switch_b1.jax_export', exp)
    entries.append({'kind': 'switch', 'batch': 1, 'file': 'switch_b1.jax_export',
                    'predictor_gflops': float(model.predictor_gflops),
                    'inputs': [dict(name=n, **_spec(s)) for n, s in zip(names, specs)],
                    'outputs': [_spec(a) for a in exp.out_avals]})

  files = [PARAMS] + [PREDICTOR_PARAMS] * (model.predictor is not None)
  files += [e['file'] for e in entries]
  manifest = {
      'format': FORMAT, 'format_version': FORMAT_VERSION,
      'platforms': list(platforms), 'jax_version': jax.__version__,
      'fingerprints': dict(model.fingerprints), 'weights_sha256': weights_digest(model),
      'guided': bool(model.exit_model.guided), 'num_exits': int(model.num_exits),
      'resolution': list(model.resolution), 'distance': model.distance,
      'buckets': list(sizes), 'num_param_leaves': len(leaves),
      'num_predictor_leaves': len(pleaves), 'exit_gflops': [float(g) for g in model.exit_gflops],
      'margins': margins,
      'margins_at': [{'threshold': t, 'margins': _margins_json(model.margins_at(t))}
                     for t in thresholds],
      'calling_convention': {
          'exit': 'fn(params leaves, *inputs) -> images',
          'switch': 'fn(params leaves, predictor leaves, margins, threshold, *inputs) '
                    '-> (image, exit id)',
          'leaves': 'params.npz / predictor_params.npz entries leaf_00000, leaf_00001, ...'},
      'artifacts': entries,
      'files': {f: _sha256(os.path.join(out_dir, f)) for f in files},
  }
  with open(os.path.join(out_dir, MANIFEST), 'w') as f:
    json.dump(manifest, f, indent=2, allow_nan=False)
  return manifest


def read_manifest(out_dir: str) -> dict[str, Any]:
  """The manifest of an export directory, its format and files checked.

  Raises:
    ExportError: no manifest, another format or version, or a file missing or damaged
      (its sha256 differs from the manifest's).
  """
  path = os.path.join(out_dir, MANIFEST)
  if not os.path.exists(path):
    raise ExportError(f'{path} does not exist; export the model first: python -m '
                      'fiancee_jax.export --workdir=WORKDIR --out=' + out_dir)
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ExportError(f'{path} is not readable JSON ({e}); export the model again') from None
  got = (manifest.get('format'), manifest.get('format_version'))
  if got != (FORMAT, FORMAT_VERSION):
    raise ExportError(f'{out_dir} holds format {got[0]!r} version {got[1]!r}; this library '
                      f'reads {FORMAT!r} version {FORMAT_VERSION}: export the model again '
                      'with this version of fiancee_jax')
  files = manifest.get('files') or {}
  needed = {a['file'] for a in manifest.get('artifacts', [])} | {PARAMS}
  unlisted = sorted(needed - set(files))
  if unlisted:
    raise ExportError(f'{path} lists no sha256 for {unlisted}, so they cannot be checked; '
                      'export the model again')
  for name, digest in files.items():
    p = os.path.join(out_dir, name)
    if not os.path.exists(p):
      raise ExportError(f'{p} is missing (listed in {path}); export the model again')
    if _sha256(p) != digest:
      raise ExportError(f'{p} is damaged: its sha256 {_sha256(p)[:12]} differs from the '
                        f"manifest's {digest[:12]}; export the model again")
  return manifest


def _load_leaves(path: str, avals: Sequence[Any]) -> list[jax.Array]:
  with np.load(path) as z:
    leaves = [z[f'leaf_{i:05d}'] for i in range(len(z.files))]
  if len(leaves) != len(avals):
    raise ExportError(f'{path} has {len(leaves)} arrays but the artifacts take {len(avals)}; '
                      'export the model again')
  # NumPy stores dtypes it does not know (bfloat16) as raw bytes: view them as the module's.
  return jax.device_put([x.view(a.dtype) if x.dtype != a.dtype else x
                         for x, a in zip(leaves, avals)])


def _check_call(entry: dict[str, Any], inputs: Sequence[Any]) -> None:
  want = [(tuple(i['shape']), i['dtype']) for i in entry['inputs']]
  got = [(tuple(np.shape(x)), np.dtype(x.dtype if hasattr(x, 'dtype') else
                                        np.asarray(x).dtype).name) for x in inputs]
  if got != want:
    raise ValueError(f"{entry['file']} takes {[i['name'] for i in entry['inputs']]} as "
                     f'{want}, got {got}; pad the batch to bucket {entry["batch"]} or use '
                     'the artifact of its size')


def load(out_dir: str) -> ExportedModel:
  """Callables running an export directory's artifacts: jax, NumPy and its files, no model code.

  Returns:
    ExportedModel(manifest, exits {(k, b): fn}, switch fn or None). Executables compile on
    their first call.

  Raises:
    ExportError: see `read_manifest`.
  """
  manifest = read_manifest(out_dir)
  exported = {}
  for e in manifest['artifacts']:
    with open(os.path.join(out_dir, e['file']), 'rb') as f:
      exported[e['file']] = jax_export.deserialize(bytearray(f.read()))
  # Every artifact takes the weights' leaves first, in the order the .npz files hold them.
  n, m = manifest['num_param_leaves'], manifest['num_predictor_leaves']
  first = exported[manifest['artifacts'][0]['file']]
  params = _load_leaves(os.path.join(out_dir, PARAMS), first.in_avals[:n])
  exits = {}
  for e in manifest['artifacts']:
    if e['kind'] == 'exit':
      call = jax.jit(exported[e['file']].call)

      def run(*inputs, call=call, entry=e):
        _check_call(entry, inputs)
        return call(params, *inputs)
      exits[(e['exit'], e['batch'])] = run
  switch = None
  entry = next((e for e in manifest['artifacts'] if e['kind'] == 'switch'), None)
  if entry is not None:
    exp = exported[entry['file']]
    predictor_params = _load_leaves(os.path.join(out_dir, PREDICTOR_PARAMS),
                                    exp.in_avals[n:n + m])
    call = jax.jit(exp.call)

    def switch(*inputs, threshold: float, margins: Sequence[float] | None = None):
      _check_call(entry, inputs)
      m = margins_for(manifest, threshold) if margins is None else margins
      return call(params, predictor_params, np.asarray(m, np.float32),
                  np.float32(threshold), *inputs)
  return ExportedModel(manifest=manifest, exits=exits, switch=switch)


def margins_for(manifest: dict[str, Any], threshold: float) -> np.ndarray:
  """float32 [E - 1] routing margins at `threshold` from the manifest.

  Raises:
    ValueError: the margins depend on the threshold and were not stored for this one.
  """
  if manifest.get('margins') is not None:
    return _margins_array(manifest['margins'])
  for m in manifest.get('margins_at', []):
    if m['threshold'] == float(threshold):
      return _margins_array(m['margins'])
  stored = [m['threshold'] for m in manifest.get('margins_at', [])]
  raise ValueError(f'the margins depend on the threshold (risk control) and were stored for '
                   f'{stored or "no threshold"}, not {threshold}; export with '
                   f'--thresholds={threshold} or pass margins=model.margins_at({threshold})')


def check_model(manifest: dict[str, Any], model: model_lib.FianceeModel) -> None:
  """Refuses an export of another model.

  Raises:
    ExportError: the exit variant, an artifact fingerprint or the weights differ; names both.
  """
  variant = lambda guided: 'guided' if guided else 'unguided'
  if bool(manifest.get('guided')) != bool(model.exit_model.guided):
    raise ExportError(f"the export holds {variant(manifest.get('guided'))} exits but the "
                      f"model's are {variant(model.exit_model.guided)}; export this variant "
                      '(--variant)')
  theirs, ours = manifest.get('fingerprints', {}), model.fingerprints
  for kind in sorted(set(theirs) | set(ours)):
    if theirs.get(kind) != ours.get(kind):
      raise ExportError(f'the export was made from another model: its {kind} fingerprint is '
                        f'{str(theirs.get(kind))[:12]}, this model\'s is '
                        f'{str(ours.get(kind))[:12]}; export this model again')
  digest = weights_digest(model)
  if manifest.get('weights_sha256') != digest:
    raise ExportError(f"the export's weights (sha256 {str(manifest.get('weights_sha256'))[:12]})"
                      f" are not this model's ({digest[:12]}); export this model again")


def export_workdir(workdir: str, out_dir: str, *, variant: str | None = None,
                   **kwargs: Any) -> dict[str, Any]:
  """`export_model` of `fiancee_jax.load_model(workdir, variant=variant)`."""
  return export_model(loading.load_model(workdir, variant=variant), out_dir, **kwargs)


def _main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}: this command takes only flags')
  split = lambda s: [x for x in s.split(',') if x]
  buckets = [int(b) for b in split(_BUCKETS.value)] or None
  manifest = export_workdir(_WORKDIR.value, _OUT.value, variant=_VARIANT.value or None,
                            buckets=buckets, platforms=split(_PLATFORMS.value) or None,
                            thresholds=[float(t) for t in split(_THRESHOLDS.value)])
  print(json.dumps({'out': _OUT.value, 'platforms': manifest['platforms'],
                    'artifacts': len(manifest['artifacts'])}))


if __name__ == '__main__':
  # Flags only when run as a script, so importing this module is side-effect free.
  _WORKDIR = flags.DEFINE_string('workdir', None, 'A trained run directory.', required=True)
  _OUT = flags.DEFINE_string('out', None, 'Directory to write the artifacts to.', required=True)
  _VARIANT = flags.DEFINE_string('variant', '', "Exits: 'guided' | 'unguided' ('' = first).")
  _BUCKETS = flags.DEFINE_string('buckets', '', 'Batch sizes, e.g. 1,2,4 ("" = the router\'s).')
  _PLATFORMS = flags.DEFINE_string('platforms', '', 'e.g. cpu,cuda,tpu ("" = this backend).')
  _THRESHOLDS = flags.DEFINE_string('thresholds', '', 'Thresholds to store margins for.')
  app.run(_main)
