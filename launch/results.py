"""Tabulates and plots a sweep: `python -m launch.results runs/lr_sweep`.

Prints a Markdown table of every run's overrides and final test metrics, best top-1
first, and writes it with a CSV copy and the runs' test top-1 curves to the sweep dir:
`results.md`, `results.csv`, `test_top1.png`.
"""

import csv
import io
import json
import os
from collections.abc import Sequence
from typing import Any

from absl import app
from matplotlib.figure import Figure

from alexnet_jax import files

METRICS = ('test_top1', 'test_top5', 'test_loss', 'step', 'wall_seconds')


def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def collect(sweep_dir: str) -> list[dict[str, Any]]:
  """One dict per run directory in `sweep_dir`, best first.

  Each has 'name', 'overrides' (from the launcher's overrides.json), 'finished'
  (results.json present), 'curve' ([(epoch, test_top1), ...] from metrics.jsonl)
  and the `METRICS`: from results.json, or for an unfinished run its latest
  evaluation (wall_seconds then None). Finished runs come first, by test top-1.
  """
  runs = []
  for name in sorted(os.listdir(sweep_dir)):
    workdir = os.path.join(sweep_dir, name)
    metrics_path = os.path.join(workdir, 'metrics.jsonl')
    results_path = os.path.join(workdir, 'results.json')
    if not os.path.exists(metrics_path) and not os.path.exists(results_path):
      continue
    tests = []
    if os.path.exists(metrics_path):  # A line torn by a kill is skipped, with a warning.
      tests = [r for r in files.read_jsonl(metrics_path) if 'test_top1' in r]
    overrides_path = os.path.join(workdir, 'overrides.json')
    run = {
      'name': name,
      'overrides': _read_json(overrides_path) if os.path.exists(overrides_path) else {},
      'finished': os.path.exists(results_path),
      'curve': [(r['epoch'], r['test_top1']) for r in tests],
    }
    latest = _read_json(results_path) if run['finished'] else (tests[-1] if tests else {})
    run.update({key: latest.get(key) for key in METRICS})
    runs.append(run)
  return sorted(runs, key=lambda r: (not r['finished'], -(r['test_top1'] or 0.0)))


def table(runs: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
  """(header, rows) of strings: run, each swept key, the metrics, status."""
  keys = list(dict.fromkeys(k for run in runs for k in run['overrides']))
  header = ['run', *keys, 'test top-1', 'test top-5', 'test loss', 'steps', 'wall (s)', 'status']
  rows = []
  for run in runs:
    fmt = lambda v, spec: '' if v is None else format(v, spec)
    rows.append(
      [
        run['name'],
        *(str(run['overrides'].get(k, '')) for k in keys),
        fmt(run['test_top1'], '.4f'),
        fmt(run['test_top5'], '.4f'),
        fmt(run['test_loss'], '.4f'),
        fmt(run['step'], 'd'),
        fmt(run['wall_seconds'], '.0f'),
        'finished' if run['finished'] else 'unfinished',
      ]
    )
  return header, rows


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = [header, ['---'] * len(header), *rows]
  return '\n'.join('| ' + ' | '.join(line) + ' |' for line in lines) + '\n'


def plot_curves(runs: Sequence[dict[str, Any]], path: str, title: str) -> str:
  """Every run's test top-1 vs epoch on one figure, legend best first; 1000×600 px."""
  fig = Figure(figsize=(10, 6))
  ax = fig.subplots()
  for run in runs:
    if run['curve']:
      epochs, top1 = zip(*run['curve'], strict=True)
      ax.plot(epochs, top1, 'o-', label=run['name'])
  ax.set(xlabel='epoch', ylabel='test top-1', title=title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  with files.replaced(path, 'wb') as f:  # Whole or not at all, as the tables.
    fig.savefig(f, dpi=100, format='png')
  return path


def write_results(sweep_dir: str) -> str:
  """Writes results.md, results.csv and test_top1.png in `sweep_dir`; returns the table.

  Raises:
    FileNotFoundError: if `sweep_dir` holds no run.
  """
  runs = collect(sweep_dir)
  if not runs:
    raise FileNotFoundError(f'No run (metrics.jsonl or results.json) in {sweep_dir}/*/.')
  header, rows = table(runs)
  text = markdown(header, rows)
  files.write_text(os.path.join(sweep_dir, 'results.md'), text)
  table_csv = io.StringIO(newline='')
  csv.writer(table_csv).writerows([header, *rows])
  files.write_text(os.path.join(sweep_dir, 'results.csv'), table_csv.getvalue())
  plot_curves(
    runs, os.path.join(sweep_dir, 'test_top1.png'), os.path.basename(os.path.normpath(sweep_dir))
  )
  return text


def main(argv):
  if len(argv) != 2:
    raise app.UsageError('Usage: python -m launch.results SWEEP_DIR')
  print(write_results(argv[1]), end='')
  print(f'Wrote results.md, results.csv and test_top1.png in {argv[1]}.')


if __name__ == '__main__':
  app.run(main)
