"""Publishes a finished run: docs/results/NAME/ and the README's results table for NAME.

  python scripts/publish_results.py --workdir=runs/default --name=landscapes \
      --config=configs/landscapes.py

Copies WORKDIR's report files (report.json over seeds, every seed's report.json, bench.json,
bench.md, the plots), config.json and timings.jsonl into docs/results/NAME/, writes
docs/results/NAME/results.md (fiancee_jax.evaluation.results_md), regenerates the index
docs/results/README.md from every folder there, and replaces the README's block between
`<!-- results:NAME -->` and `<!-- /results:NAME -->` (if it has one) with
results_md.headline. command.txt is the command that reproduces the run: --config plus a
`--config.KEY=VALUE` for every setting where the run's config.json differs from that config.
Nothing is typed by hand.
"""
import glob
import json
import os
import runpy
import shlex
import shutil
from typing import Any

from absl import app
from absl import flags

from fiancee_jax.evaluation import results_md

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, 'docs', 'results')
REPORT_FILES = ('report.json', 'bench.json', 'bench.md', 'distance_vs_gflops.png',
                'exit_histogram.png', 'predicted_vs_true.png', 'samples.png')

FLAGS = flags.FLAGS


def copy_run(workdir: str, out: str) -> None:
  """The run's report files, config.json, timings.jsonl and per-seed reports into `out`."""
  if os.path.isdir(out):
    shutil.rmtree(out)
  os.makedirs(out)
  report = os.path.join(workdir, 'report')
  if not os.path.exists(os.path.join(report, 'report.json')):
    raise SystemExit(f'{report}/report.json is missing: run the evaluate stage first')
  for name in REPORT_FILES:
    if os.path.exists(os.path.join(report, name)):
      shutil.copyfile(os.path.join(report, name), os.path.join(out, name))
  for name in ('config.json', 'timings.jsonl', 't_star.json'):
    if os.path.exists(os.path.join(workdir, name)):
      shutil.copyfile(os.path.join(workdir, name), os.path.join(out, name))
  for path in sorted(glob.glob(os.path.join(workdir, 'seeds', '*', 'report', 'report.json'))):
    seed = path.split(os.sep)[-3]
    shutil.copyfile(path, os.path.join(out, f'report_seed{seed}.json'))


def _flat(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f'{prefix}{k}.'))
    return out
  return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def _value(v: Any) -> str:
  if isinstance(v, list):
    return '(' + ','.join(_value(x) for x in v) + (',)' if len(v) == 1 else ')')
  return repr(v) if isinstance(v, str) else str(v)


def config_overrides(config_arg: str, workdir: str) -> list[str]:
  """`--config.KEY=VALUE` for each setting of WORKDIR/config.json that differs from
  `config_arg` (path[:variant]), in key order."""
  path, _, variant = config_arg.partition(':')
  module = runpy.run_path(os.path.join(REPO, path) if not os.path.isabs(path) else path)
  base = _flat(json.loads(module['get_config'](variant or None).to_json()))
  with open(os.path.join(workdir, 'config.json')) as f:
    run = _flat(json.load(f))
  unknown = sorted(set(run) - set(base))
  if unknown:
    raise SystemExit(f'{workdir}/config.json has keys that {config_arg} lacks: {unknown}')
  return [f'--config.{k}={_value(run[k])}' for k in sorted(run) if run[k] != base[k]]


def index() -> str:
  """docs/results/README.md: one row per published folder with its headline at t*."""
  rows = []
  for folder in sorted(glob.glob(os.path.join(RESULTS, '*', 'report.json'))):
    name = os.path.basename(os.path.dirname(folder))
    with open(folder) as f:
      r = json.load(f)
    p = r.get('at_t_star') or {}
    seeds = len(r.get('seeds') or [])
    with open(os.path.join(os.path.dirname(folder), 'command.txt')) as f:
      config = f.read().split('--config=')[1].split()[0]
    rows.append(f"| [{name}]({name}/results.md) | `{config}` | {r['distance']} | {seeds} | "
                f"{results_md._fmt(r['t_star']['value'])} | "
                f"{results_md._fmt(p.get('saved_fraction'))} | "
                f"{results_md._fmt(p.get('oracle_saved_fraction'))} | "
                f"{results_md._fmt(r.get('curve_efficiency'))} |")
  return '\n'.join([
      '# Results', '',
      'One folder per config, each holding the files of one finished run of that config\'s '
      'main job and `results.md`, the tables generated from them. Regenerate a folder with:',
      '', '```',
      'python -m fiancee_jax.main --config=configs/landscapes.py --workdir=runs/landscapes',
      'python scripts/publish_results.py --workdir=runs/landscapes --name=landscapes '
      '--config=configs/landscapes.py',
      '```', '',
      '| run | config | distance | seeds | t* | routed saved at t* | oracle saved at t* | '
      'curve efficiency |',
      '|---|---|---|---|---|---|---|---|', *rows, ''])


def replace_block(text: str, name: str, body: str) -> str:
  """`text` with the block between the markers of `name` replaced by `body`."""
  start, end = f'<!-- results:{name} -->', f'<!-- /results:{name} -->'
  if start not in text or end not in text:
    raise SystemExit(f'README.md has no {start} ... {end} block')
  head, rest = text.split(start, 1)
  _, tail = rest.split(end, 1)
  return f'{head}{start}\n{body}\n{end}{tail}'


def main(argv):
  del argv
  out = os.path.join(RESULTS, FLAGS.name)
  copy_run(FLAGS.workdir, out)
  command = shlex.join(['python', '-m', 'fiancee_jax.main', f'--config={FLAGS.config}',
                        f'--workdir=runs/{FLAGS.name}',
                        *([f'--stages={FLAGS.stages}'] if FLAGS.stages else []),
                        *config_overrides(FLAGS.config, FLAGS.workdir)])
  with open(os.path.join(out, 'command.txt'), 'w') as f:
    f.write(command + '\n')
  with open(os.path.join(out, 'results.md'), 'w') as f:
    f.write(f'# {FLAGS.name}\n\n`{command}`\n\n' + results_md.render(FLAGS.workdir, None) + '\n')
  with open(os.path.join(RESULTS, 'README.md'), 'w') as f:
    f.write(index())
  with open(os.path.join(out, 'report.json')) as f:
    table = results_md.headline(json.load(f))
  readme = os.path.join(REPO, 'README.md')
  with open(readme) as f:
    text = f.read()
  if f'<!-- results:{FLAGS.name} -->' not in text:
    print(f'README.md has no results block for {FLAGS.name}; only docs/results was written')
    return
  with open(readme, 'w') as f:
    f.write(replace_block(text, FLAGS.name, table))


if __name__ == '__main__':
  # Defined only when run as a program, so that importing the module adds no flags.
  flags.DEFINE_string('workdir', None, 'A finished workdir.', required=True)
  flags.DEFINE_string('name', None, 'Folder name under docs/results.', required=True)
  flags.DEFINE_string('config', None, "The run's --config (e.g. configs/landscapes.py:guided)",
                      required=True)
  flags.DEFINE_string('stages', '', "The run's --stages, when not every stage ran.")
  app.run(main)
