"""Summarise sweeps written by parallel_gan.py into the README's tables and plots.

    python tests/summarize_runs.py out/study/full                 # folders named DATASET-P<n_pairs>-K<K>-s<seed>
    python tests/summarize_runs.py out/study/full --plot=full.png # and metrics against iterations, K as colour

After `parallel_gan.py --compare=FOLDER`, it also averages FOLDER/compare_best.csv: the best generator of each
run (by the other runs' discriminators), mean and standard deviation over seeds per configuration.

For each run, the metrics of its last evaluation are averaged over its generators (the d_*
columns over its discriminators); the table shows the mean and standard deviation of those
run averages over seeds. The plot shows, per K, the mean over seeds of the run averages at
every evaluation, with a band from the lowest to the highest seed.
"""
import argparse
import csv
import glob
import math
import os
import re
import statistics
from collections import defaultdict

METRICS = [('modes', 'modes covered', '.2f'), ('modes_captured', 'modes captured', '.2f'), ('kl', 'KL to uniform', '.3f'),
           ('high_quality', 'high quality', '.3f'), ('score', 'classifier score', '.2f'),
           ('confidence', 'confidence', '.3f'), ('fd', 'Frechet distance', '.4g'),
           ('d_train', 'D(x) train', '.3f'), ('d_heldout', 'D(x) held-out', '.3f'), ('d_gap', 'D(x) gap', '.3f'),
           ('d_acc_gap', 'accuracy gap', '.3f')]
NAME = re.compile(r'(\w+)-P(\d+)-K(\d+)-s(\d+)')


def number(text):
    return float(text) if text not in ('', None) else math.nan


def by_iteration(path):
    """{iteration: {metric: average over the run's generators}} of one run's metrics.csv."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    result = {}
    for it in sorted({int(r['iteration']) for r in rows}):
        mine = [r for r in rows if int(r['iteration']) == it]
        result[it] = {key: statistics.mean(number(r.get(key)) for r in mine) for key, _, _ in METRICS}
    return result


def mean_and_spread(values, fmt, spread_fmt=None):
    """'mean ± std' of values (std 0 for one value)."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f'{statistics.mean(values):{fmt}} ± {spread:{spread_fmt or fmt}}'


def load(folder):
    """{(dataset, P, K): [per-seed {iteration: metrics}]} of every run folder under folder."""
    groups = defaultdict(list)
    for path in sorted(glob.glob(os.path.join(folder, '*', 'metrics.csv'))):
        match = NAME.fullmatch(os.path.basename(os.path.dirname(path)))
        run = by_iteration(path) if match else {}
        if run:
            groups[match[1], int(match[2]), int(match[3])].append(run)
    for key, runs in groups.items():  # a run still going (fewer evaluations than the others) is left out
        groups[key] = [run for run in runs if max(run) == max(max(r) for r in runs)]
    return groups


def table(groups):
    for dataset in sorted({key[0] for key in groups}):
        keys = sorted((k for k in groups if k[0] == dataset), key=lambda k: (k[1], k[2] != 0, k[2]))
        finals = {k: [run[max(run)] for run in groups[k]] for k in keys}
        shown = [(key, name, fmt) for key, name, fmt in METRICS
                 if any(all(not math.isnan(run[key]) for run in finals[k]) for k in keys)]  # drop all-nan columns
        print(f'\n{dataset}\n')
        print('| n_pairs | K | seeds | iterations | ' + ' | '.join(name for _, name, _ in shown) + ' |')
        print('|---' * (4 + len(shown)) + '|')
        for k in keys:
            cells = [mean_and_spread([run[metric] for run in finals[k]], fmt) for metric, _, fmt in shown]
            print(f'| {k[1]} | {k[2]} | {len(finals[k])} | {max(groups[k][0])} | ' + ' | '.join(cells) + ' |')


def best_of_runs(path):
    """The table of compare_best.csv: per configuration, mean ± std over runs of each best generator's metrics."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    columns = [c for c in ('pool_error', 'modes', 'modes_captured', 'high_quality', 'score', 'fd')
               if any(not math.isnan(number(r[c])) for r in rows)]
    print(f'\nbest generator of each run ({path})\n')
    print('| configuration | runs | ' + ' | '.join(columns) + ' |')
    print('|---' * (2 + len(columns)) + '|')
    for configuration in dict.fromkeys(r['configuration'] for r in rows):
        mine = [r for r in rows if r['configuration'] == configuration]
        cells = [mean_and_spread([number(r[c]) for r in mine], '.4g', '.2g') for c in columns]
        print(f'| {configuration} | {len(mine)} | ' + ' | '.join(cells) + ' |')


def plot(groups, path, keys=('modes', 'fd', 'd_gap')):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    names = dict((key, name) for key, name, _ in METRICS)
    datasets = sorted({k[0] for k in groups})
    fig, axes = plt.subplots(len(datasets), len(keys), figsize=(4.6 * len(keys), 3.4 * len(datasets)), squeeze=False)
    for row, dataset in zip(axes, datasets):
        for ax, key in zip(row, keys):
            for colour, k in enumerate(sorted((k for k in groups if k[0] == dataset), key=lambda k: (k[1], k[2]))):
                its = sorted(set.intersection(*(set(run) for run in groups[k])))
                values = [[run[it][key] for run in groups[k]] for it in its]
                ax.plot(its, [statistics.mean(v) for v in values], color=f'C{colour}', label=f'K={k[2]} (P={k[1]})')
                ax.fill_between(its, [min(v) for v in values], [max(v) for v in values], color=f'C{colour}', alpha=0.2)
            ax.set(title=f'{dataset}: {names[key]}', xlabel='iteration')
        row[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('folder', nargs='?', default='out/runs')
    parser.add_argument('--plot', help='also draw the metrics against iterations into this PNG file')
    args = parser.parse_args()
    groups = load(args.folder)
    table(groups)
    if os.path.exists(os.path.join(args.folder, 'compare_best.csv')):
        best_of_runs(os.path.join(args.folder, 'compare_best.csv'))
    if args.plot:
        plot(groups, args.plot)
