"""Converts pytorch-fid's FID Inception weights (.pth) into one .npz for fiancee_jax.

Run once, on any machine with torch (fiancee_jax itself never imports torch); ~10 s:

  pip install torch
  URL=https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights
  wget $URL/pt_inception-2015-12-05-6726825d.pth
  python scripts/convert_fid_weights.py --pth=pt_inception-2015-12-05-6726825d.pth \
      --output=weights/fid_inception.npz

If pytorch-fid is installed and has run once, the file is already in the torch hub cache:
$HOME/.cache/torch/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth. The state dict of
pytorch-fid's `InceptionV3()` wrapper (`torch.save(model.state_dict(), 'fid.pth')`) works too.
torchvision's ImageNet `inception_v3` weights are refused: their FIDs are not comparable.

Then: `fid.make_feature_fn(fid.load_params('weights/fid_inception.npz'))`. The key mapping and
checks are `fiancee_jax.metrics.fid.convert_state_dict`, driven by `fid.npz_shapes()`; the .npz
layout is documented in fiancee_jax/metrics/fid.py.
"""
import argparse
import hashlib
import os
import sys
from collections.abc import Callable

import numpy as np

try:
  from fiancee_jax.metrics import fid
except ImportError:  # run as `python scripts/convert_fid_weights.py` from a source checkout
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from fiancee_jax.metrics import fid

# pytorch-fid's file name carries the first 8 hex digits of its sha256 (torch.hub convention).
OFFICIAL_SHA256_PREFIX = '6726825d'


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--pth', required=True,
                      help=f'pytorch-fid state dict, e.g. {fid.OFFICIAL_WEIGHTS}.')
  parser.add_argument('--output', required=True, help='Where to write the .npz.')
  return parser.parse_args(argv)


def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """torch.load(path) -> {name: float NumPy array}; torch is imported only here."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise SystemExit('This conversion needs PyTorch, once: `pip install torch`.') from e
  state = torch.load(path, map_location='cpu', weights_only=True)
  if hasattr(state, 'state_dict'):
    state = state.state_dict()
  if isinstance(state, dict) and 'state_dict' in state:
    state = state['state_dict']
  return {key: value.detach().cpu().float().numpy()
          for key, value in state.items() if hasattr(value, 'detach')}


def convert(pth: str, output: str,
            load: Callable[[str], dict[str, np.ndarray]] = load_state_dict) -> str:
  """Converts `pth` to `output` (.npz appended if missing), checks the round trip; returns it.

  `load` reads the state dict; tests pass a fake one, so everything but torch.load runs there.
  """
  if not os.path.isfile(pth):
    raise SystemExit(f'No such file: {pth!r}.')
  sha256 = sha256_of(pth)
  if not sha256.startswith(OFFICIAL_SHA256_PREFIX):
    print(f'WARNING: {pth!r} has sha256 {sha256[:16]}..., not {OFFICIAL_SHA256_PREFIX}... of '
          f'{fid.OFFICIAL_WEIGHTS}; its FIDs will not match pytorch-fid\'s.', file=sys.stderr)
  arrays = fid.convert_state_dict(load(pth), source=f'weights file {pth!r}', sha256=sha256)
  if not output.endswith('.npz'):
    output += '.npz'  # np.savez would add it anyway
  if os.path.dirname(output):
    os.makedirs(os.path.dirname(output), exist_ok=True)
  np.savez(output, **arrays)
  fid.load_params(output)  # the round trip the evaluation code will do
  count = sum(a.size for k, a in arrays.items() if k in fid.npz_shapes())
  print(f'Wrote {output}: FID Inception, {len(arrays)} arrays, {count:,} values.')
  return output


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  convert(args.pth, args.output)


if __name__ == '__main__':
  main()
