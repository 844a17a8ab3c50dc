"""Summarise sweeps written by parallel_gan.py into the README's tables.

    python tests/summarize_runs.py out/runs        # folders named DATASET-P<n_pairs>-K<K>-s<seed>

For each run, the metrics of its last evaluation are averaged over its generators; the
table shows the mean and standard deviation of those run averages over seeds.
"""
import csv
import glob
import os
import re
import statistics
import sys
from collections import defaultdict

METRICS = [('modes', 'modes covered', '.2f'), ('kl', 'KL to uniform', '.3f'), ('high_quality', 'in 3 std', '.3f'),
           ('score', 'classifier score', '.2f'), ('confidence', 'confidence', '.3f'), ('fd', 'Frechet distance', '.4g'),
           ('pool_mean', 'D-pool mean', '.3f'), ('pool_worst', 'D-pool worst', '.3f')]


def last_evaluation(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    final = max(int(r['iteration']) for r in rows)
    return final, [r for r in rows if int(r['iteration']) == final]


def main(folder):
    groups = defaultdict(list)  # (dataset, P, K) -> one dict of generator-averaged metrics per seed
    for path in sorted(glob.glob(os.path.join(folder, '*', 'metrics.csv'))):
        match = re.fullmatch(r'(\w+)-P(\d+)-K(\d+)-s(\d+)', os.path.basename(os.path.dirname(path)))
        if not match:
            continue
        final, rows = last_evaluation(path)
        run = {key: statistics.mean(float(r[key]) for r in rows) for key, _, _ in METRICS}
        groups[match[1], int(match[2]), int(match[3])].append((final, run))
    for dataset in sorted({key[0] for key in groups}):
        keys = sorted((k for k in groups if k[0] == dataset), key=lambda k: (k[1], k[2] == 0, k[2]))
        shown = [(key, name, fmt) for key, name, fmt in METRICS
                 if any(all(v == v for v in (run[key] for _, run in groups[k])) for k in keys)]  # drop all-nan columns
        print(f'\n{dataset}\n')
        print('| n_pairs | K | seeds | iterations | ' + ' | '.join(name for _, name, _ in shown) + ' |')
        print('|---' * (4 + len(shown)) + '|')
        for key in keys:
            runs = groups[key]
            cells = []
            for metric, _, fmt in shown:
                values = [run[metric] for _, run in runs]
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f'{statistics.mean(values):{fmt}} ± {spread:{fmt}}')
            print(f'| {key[1]} | {key[2]} | {len(runs)} | {runs[0][0]} | ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
    main(sys.argv[1] if len(sys.argv) > 1 else 'out/runs')
