"""Worker process of the procedural TFDS builders: generates one part of a split.

  python procedural_worker.py GENERATOR_PATH START STOP KWARGS_JSON OUT_NPZ

Run by path (`procedural_tfds` starts it with `sys.executable -P`), so that neither the
package's `__init__` nor the caller's `__main__` is imported (unlike multiprocessing's
spawn), and nothing is forked from a threaded process. It loads the generator module by
path (a module that imports only NumPy), calls `example(index=i, **kwargs)` for
`START <= i < STOP` and saves the stacked arrays, one array per example key, to OUT_NPZ
(an empty .npz for an empty part). Imports the standard library and NumPy only.
"""
import importlib.util
import json
import sys

import numpy as np


def generate_part(generator_path: str, start: int, stop: int, kwargs: dict, out: str) -> None:
  """Writes examples [start, stop) of the generator at `generator_path` to `out` (.npz)."""
  spec = importlib.util.spec_from_file_location('_procedural_generator', generator_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  examples = [module.example(index=i, **kwargs) for i in range(start, stop)]
  arrays = {k: np.stack([ex[k] for ex in examples]) for k in examples[0]} if examples else {}
  np.savez(out, **arrays)


def main(argv: list[str]) -> None:
  if len(argv) != 6:
    raise SystemExit(f'usage: {argv[0]} GENERATOR_PATH START STOP KWARGS_JSON OUT_NPZ')
  path, start, stop, kwargs, out = argv[1:]
  generate_part(path, int(start), int(stop), json.loads(kwargs), out)


if __name__ == '__main__':
  main(sys.argv)
