"""Exported exits (fiancee_jax/export.py) of the tiny job: identical outputs after the round
trip, every file checked, exports of another model refused."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import fiancee_jax
from fiancee_jax import export
from fiancee_jax.models import factory
from fiancee_jax.routing import router as router_lib

# Tests that use the shared `tiny_run` job run on one xdist worker (--dist loadgroup).
pytestmark = pytest.mark.xdist_group('tiny_run')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKETS = (1, 4)
THRESHOLDS = (0.0, 0.05, 0.2, 10.0)


@pytest.fixture(scope='module')
def model(tiny_run):
  return fiancee_jax.load_model(tiny_run[0])


@pytest.fixture(scope='module')
def exported(model, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('exported'))
  export.export_model(model, out, buckets=BUCKETS, thresholds=THRESHOLDS)
  return out


def _inputs(model, b, seed=0):
  h, w = model.resolution
  labels = np.random.default_rng(seed).integers(0, model.task.num_classes, (b, h, w), np.int32)
  return tuple(np.asarray(x) for x in model.make_inputs(labels, jax.random.key(seed)))


def test_manifest_describes_every_artifact(model, exported):
  manifest = export.read_manifest(exported)
  e = model.num_exits
  assert manifest['format_version'] == export.FORMAT_VERSION
  assert manifest['platforms'] == [jax.default_backend()]
  assert manifest['fingerprints'] == model.fingerprints and set(model.fingerprints) >= {
      'backbone', 'exits', 'predictor'}
  exits = [a for a in manifest['artifacts'] if a['kind'] == 'exit']
  assert sorted((a['exit'], a['batch']) for a in exits) == [
      (k, b) for k in range(e) for b in BUCKETS]
  h, w = model.resolution
  for a in exits:
    assert a['gflops_per_image'] == pytest.approx(model.exit_gflops[a['exit']])
    assert a['is_backbone'] == (a['exit'] == e - 1)
    assert a['inputs'] == [
        {'name': 'labels', 'shape': [a['batch'], h, w], 'dtype': 'int32'},
        {'name': 'z', 'shape': [a['batch'], model.task.noise_dim], 'dtype': 'float32'}]
    assert a['outputs'] == [{'shape': [a['batch'], h, w, 3], 'dtype': 'float32'}]
  (switch,) = [a for a in manifest['artifacts'] if a['kind'] == 'switch']
  assert switch['outputs'] == [{'shape': [1, h, w, 3], 'dtype': 'float32'},
                               {'shape': [], 'dtype': 'int32'}]
  # Every file is listed with its hash; weights are stored once, not per artifact.
  assert set(manifest['files']) == {a['file'] for a in manifest['artifacts']} | {
      export.PARAMS, export.PREDICTOR_PARAMS}
  assert set(os.listdir(exported)) == set(manifest['files']) | {export.MANIFEST}


def test_every_exit_and_bucket_round_trips_to_identical_outputs(model, exported):
  loaded = export.load(exported)
  assert set(loaded.exits) == {(k, b) for k in range(model.num_exits) for b in BUCKETS}
  for k, path in enumerate(model.paths()):
    own = jax.jit(path)
    for b in BUCKETS:
      inputs = _inputs(model, b, seed=b)
      np.testing.assert_array_equal(np.asarray(loaded.exits[(k, b)](*inputs)),
                                    np.asarray(own(model.params, *inputs)),
                                    err_msg=f'exit {k} bucket {b}')
  with pytest.raises(ValueError, match='bucket 4'):
    loaded.exits[(0, 4)](*_inputs(model, 1))


def test_switch_router_round_trips_to_identical_outputs(model, exported):
  loaded = export.load(exported)
  own = router_lib.SwitchRouter(model)
  taken = set()
  for i, t in enumerate(THRESHOLDS):
    one = _inputs(model, 1, seed=10 + i)
    image, k = loaded.switch(*one, threshold=t)
    want_image, want_k = own(one, t)
    assert int(k) == int(want_k)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(want_image))
    taken.add(int(k))
  assert model.num_exits - 1 in taken  # threshold 0: the backbone
  # Risk-control margins depend on the threshold: one not stored needs margins=.
  with pytest.raises(ValueError, match='--thresholds=0.123'):
    loaded.switch(*_inputs(model, 1), threshold=0.123)
  image, k = loaded.switch(*_inputs(model, 1), threshold=0.123,
                           margins=model.margins_at(0.123))
  assert int(k) == int(own(_inputs(model, 1), 0.123)[1])


def test_damaged_missing_or_other_format_files_are_refused(exported, tmp_path):
  def copy(name):
    d = str(tmp_path / name)
    shutil.copytree(exported, d)
    return d

  d = copy('damaged')
  with open(os.path.join(d, 'exit0_b1.jax_export'), 'r+b') as f:
    f.seek(100)
    byte = f.read(1)
    f.seek(100)
    f.write(bytes([byte[0] ^ 0xFF]))
  with pytest.raises(export.ExportError, match='exit0_b1.jax_export is damaged'):
    export.load(d)
  d = copy('missing')
  os.remove(os.path.join(d, export.PARAMS))
  with pytest.raises(export.ExportError, match='params.npz is missing'):
    export.load(d)
  d = copy('format')
  path = os.path.join(d, export.MANIFEST)
  with open(path) as f:
    manifest = json.load(f)
  with open(path, 'w') as f:
    json.dump({**manifest, 'format_version': export.FORMAT_VERSION + 1}, f)
  with pytest.raises(export.ExportError, match='version 2.*export the model again'):
    export.load(d)
  with open(path, 'w') as f:
    json.dump({**manifest, 'files': {}}, f)  # nothing to check the files against
  with pytest.raises(export.ExportError, match='lists no sha256'):
    export.load(d)
  with pytest.raises(export.ExportError, match='does not exist'):
    export.load(str(tmp_path / 'nothing'))


def test_an_export_of_another_model_is_refused(model, exported, tiny_run):
  manifest = export.read_manifest(exported)
  export.check_model(manifest, model)  # its own model passes
  other = dict(model.fingerprints, exits='f' * 64)
  with pytest.raises(export.ExportError,
                     match=f"exits fingerprint is {model.fingerprints['exits'][:12]}, this "
                           "model's is ffffffffffff"):
    export.check_model(manifest, model.replace(fingerprints=other))
  retrained = model.replace(params={**model.params, 'exits': jax.tree.map(
      lambda x: x + 1, model.params['exits'])})
  with pytest.raises(export.ExportError, match='weights'):
    export.check_model(manifest, retrained)
  assert factory.exit_variants(tiny_run[1]) == ('guided', 'unguided')
  unguided = fiancee_jax.load_model(tiny_run[0], variant='unguided')
  with pytest.raises(export.ExportError, match='guided exits but the model'):
    export.check_model(manifest, unguided)


def test_several_platforms_export_without_their_devices(model, tmp_path):
  out = str(tmp_path / 'all')
  manifest = export.export_model(model, out, buckets=(1,), platforms=('cpu', 'cuda', 'tpu'))
  assert manifest['platforms'] == ['cpu', 'cuda', 'tpu']
  if jax.default_backend() == 'cpu':
    inputs = _inputs(model, 1)
    got = export.load(out).exits[(0, 1)](*inputs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(
        jax.jit(model.paths()[0])(model.params, *inputs)), atol=1e-6)
  with pytest.raises(ValueError, match='platforms'):
    export.export_model(model, out, platforms=('gpu',))


def test_cli_exports_and_the_artifacts_run_on_jax_alone(model, tiny_run, tmp_path):
  out = str(tmp_path / 'cli')
  env = dict(os.environ, PYTHONPATH=REPO)
  subprocess.run([sys.executable, '-m', 'fiancee_jax.export', f'--workdir={tiny_run[0]}',
                  f'--out={out}', '--buckets=2'], check=True, env=env, cwd=REPO)
  # The manifest's calling convention, followed by a process that imports jax and NumPy only.
  inputs = _inputs(model, 2)
  np.savez(str(tmp_path / 'inputs.npz'), *inputs)
  script = (
      'import json, sys, jax, numpy as np\n'
      'from jax import export\n'
      'out, inputs = sys.argv[1], np.load(sys.argv[2])\n'
      "m = json.load(open(out + '/manifest.json'))\n"
      "a = [a for a in m['artifacts'] if a['kind'] == 'exit' and a['exit'] == 0][0]\n"
      "exp = export.deserialize(bytearray(open(out + '/' + a['file'], 'rb').read()))\n"
      "p = np.load(out + '/params.npz')\n"
      "params = [p[f'leaf_{i:05d}'] for i in range(m['num_param_leaves'])]\n"
      "x = [inputs[f'arr_{i}'] for i in range(len(a['inputs']))]\n"
      "np.save(sys.argv[3], np.asarray(exp.call(params, *x)))\n"
      "assert not [n for n in sys.modules if n.startswith('fiancee_jax')]\n")
  subprocess.run([sys.executable, '-c', script, out, str(tmp_path / 'inputs.npz'),
                  str(tmp_path / 'images.npy')], check=True, cwd=str(tmp_path))
  np.testing.assert_array_equal(np.load(str(tmp_path / 'images.npy')), np.asarray(
      jax.jit(model.paths()[0])(model.params, *inputs)))


def test_the_default_job_writes_hlo_memory_and_traces(model, tiny_run):
  report = os.path.join(tiny_run[0], 'report')
  with open(os.path.join(report, 'bench.json')) as f:
    bench = json.load(f)
  b = bench['batch_size']
  assert bench['profile']['hlo_dir'] == 'hlo' and bench['profile']['trace_dir'] == 'trace'
  for k in range(model.num_exits):
    for batch in (1, b):
      assert os.path.getsize(os.path.join(report, 'hlo', f'exit{k}_b{batch}.hlo.txt')) > 0
      assert os.path.getsize(os.path.join(report, 'hlo', f'exit{k}_b{batch}.memory.json')) > 0
    traces = os.path.join(report, 'trace', f'exit{k}_b{b}')
    assert [f for _, _, files in os.walk(traces) for f in files], traces
  with open(os.path.join(report, 'bench.md')) as f:
    assert 'Top ops by time' in f.read()
