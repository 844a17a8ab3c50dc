"""Rebuild the study's tables, intervals and figures from the study's CSV alone (a row per run and generator, as
study/sweep.py writes it): every table into study/RESULTS.md, the generated blocks of README.md and study/README.md,
a short summary on the screen.

    python study/summarize_runs.py                             # study/runs.csv -> study/RESULTS.md and both READMEs
    python study/summarize_runs.py FILE.csv --results=R.md     # another CSV, another results file (no README)
    python study/summarize_runs.py --figures=.assets           # and the forest plot and the per-seed figures
    python study/summarize_runs.py --readmes A.md B.md         # rebuild these files' blocks (--readmes alone: none)

A generated block is the lines between
    <!-- generated: NAME (rebuilt by study/summarize_runs.py from study/runs.csv) -->
    <!-- /generated: NAME -->
(each marker a line of its own); GENERATED[NAME](runs) makes its content. A block without a builder, or a builder
without a block in any of the files, is refused in one line, before any file is rewritten.

study/README.md's protocol: a run's value is its generators' (or discriminators') mean in the claim's metric; the
effect is mean(K>0) - mean(K=0) over seeds; its 95% interval a percentile bootstrap over seeds (each arm resampled
with replacement, 10,000 times, numpy's default_rng(0)); the verdict says which way where the interval excludes 0,
else "no difference detected".
"""
import argparse
import csv
import math
import os
import re
import sys
import textwrap
from collections import defaultdict

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)  # study/ -> the repository
STUDY_CSV = os.path.join(ROOT, 'study', 'runs.csv')
RESULTS = os.path.join(HERE, 'RESULTS.md')
EARLIER = os.path.join(HERE, 'earlier_study.md')  # the earlier study's tables: no CSV holds its runs
READMES = (os.path.join(ROOT, 'README.md'), os.path.join(HERE, 'README.md'))  # the files with generated blocks
RESAMPLES = 10_000
# claim: (its name, the metric on images, on 2-D points, +1 where higher is better for GAP, what better/worse say)
CLAIMS = {
    'coverage': ('mode coverage', 'modes', 'modes_captured', +1, ('more modes', 'fewer modes')),
    'gam2': ('GAM-II (one pool judges every generator)', 'pool_error', 'pool_error', +1,
             ('fools the pool more', 'fools the pool less')),
    'generalisation': ('generalisation (D(x) gap, train - held-out)', 'd_gap', 'd_gap', -1,
                       ('smaller gap', 'larger gap')),
}
DATA_NAMES = {('mnist', 0): 'MNIST, 60,000', ('mnist', 1000): 'MNIST, 1,000', ('r15', 100): 'R15, 100 points',
              ('grid25', 0): 'grid25, 60,000', ('grid25', 2500): 'grid25, 2,500', ('ring8', 0): 'ring8, 60,000',
              ('stacked_mnist', 0): 'Stacked MNIST, 128,000'}
CONDITION_NAMES = {'script': "script's conditions", 'paper': "paper's conditions"}
SETTING = ('lr', 'h_dim', 'z_dim')  # what the robustness check varies
BIMODAL = 'r15_paper_lr2e-4_z2'  # the robustness check's bimodal cell again, with 20 seeds per arm
ROBUSTNESS_PARTS = ('robust_r15', BIMODAL)
RERUNS = {'r15_script_plain': 'r15_script', 'r15_paper_plain': 'r15_paper'}  # a part run again by later code
# a part the main tables leave out once its successor has runs (fixed before the successor's first run): Stacked
# MNIST under the script's conditions at 5 epochs, where samples start to be digits, in place of 0.75 of an epoch
SUPERSEDED = {'stacked_script': 'stacked_script_long'}
# each of the paper's conditions alone: (data, condition, the part of its K>0 runs, that K, the part of its K=0 runs).
# r15_swap_matching's K=0 is r15_script's: without swaps the swap rule does nothing.
ALONE = [('R15, 100 points', 'script (none of the six)', 'r15_script', 2, 'r15_script'),
         *[('R15, 100 points', f'{c} alone', f'r15_{c}', 2, 'r15_script' if c == 'swap_matching' else f'r15_{c}')
           for c in ('own_noise', 'prior_mixed', 'input_noise', 'clip', 'swap_matching', 'batch_norm')],
         ('R15, 100 points', 'paper_without_batch_norm', 'r15_paper_without_batch_norm', 2,
          'r15_paper_without_batch_norm'),
         ('R15, 100 points', 'paper (all six)', 'r15_paper', 2, 'r15_paper'),
         ('R15, 100 points', 'paper (all six), plain code', 'r15_paper_plain', 2, 'r15_paper_plain'),
         # the authors' code (hma02/GAN-evaluation) on top of the paper's: each of its two unstated choices, and both
         ('R15, 100 points', 'paper + same_init', 'r15_paper_same_init', 2, 'r15_paper_same_init'),
         ('R15, 100 points', "paper + swap_moves='weights'", 'r15_paper_swap_weights', 2, 'r15_paper_swap_weights'),
         ('R15, 100 points', "paper + both: the authors' code", 'r15_paper_authors_code', 2, 'r15_paper_authors_code'),
         ('MNIST, 1,000', 'script (none of the six)', 'mnist1000_script', 16, 'mnist1000_script'),
         ('MNIST, 1,000', 'batch_norm alone', 'mnist1000_batch_norm', 16, 'mnist1000_batch_norm'),
         ('MNIST, 1,000', 'paper (all six)', 'mnist1000_paper', 16, 'mnist1000_paper')]


def number(text):
    return float(text) if text not in ('', None) else math.nan


def read_runs(path):
    """{(part, run): {'rows': its generator rows, plus its configuration}} of the CSV, in file order."""
    runs = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            run = runs.setdefault((row['part'], row['run']), {**row, 'rows': []})
            run['rows'].append(row)
    for run in runs.values():
        run['K'], run['seed'], run['train_size'] = int(run['K']), int(run['seed']), int(run['train_size'])
        run['pack'] = int(run.get('pack') or 1)  # a CSV from before PacGAN's packing: every D judged one sample
        run.setdefault('commit', '')  # a CSV from before the column
    return list(runs.values())


def value(run, metric):
    """A run's value in a metric: the mean over its generators' rows (nan where the metric is missing)."""
    values = [number(r[metric]) for r in run['rows']]
    return math.nan if any(math.isnan(v) for v in values) else float(np.mean(values))


def metric_of(claim, dataset):
    _, images, points, _, _ = CLAIMS[claim]
    return images if dataset in ('mnist', 'fashion_mnist', 'stacked_mnist') else points


def bootstrap(treated, baseline, resamples=RESAMPLES):
    """(effect, low, high): mean(treated) - mean(baseline) and its 95% percentile interval, resampling each arm's
    seeds with replacement."""
    a, b = np.asarray(treated, float), np.asarray(baseline, float)
    rng = np.random.default_rng(0)
    diffs = (a[rng.integers(0, len(a), (resamples, len(a)))].mean(1)
             - b[rng.integers(0, len(b), (resamples, len(b)))].mean(1))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return float(a.mean() - b.mean()), float(low), float(high)


def verdict(claim, effect, low, high):
    """'yes: ...' / 'no: ...' where the interval excludes 0, else 'no difference detected'."""
    better, worse = CLAIMS[claim][4]
    if low <= 0 <= high:
        return 'no difference detected'
    return f'yes: {better}' if effect * CLAIMS[claim][3] > 0 else f'no: {worse}'


def cells(runs):
    """Every comparison of the study: a dict per (part, condition, data, setting, K>0) with each arm's runs."""
    groups = defaultdict(list)
    for run in runs:
        groups[run['part'], run['condition'], run['dataset'], run['train_size'], *(run[k] for k in SETTING),
               run['pack']].append(run)
    found = []
    for key, members in groups.items():
        baseline = [r for r in members if r['arm'] == 'baseline']
        arm_of = {r['K']: r['arm'] for r in members}
        for K in sorted((K for K in arm_of if K > 0), key=lambda K: (arm_of[K] != 'primary', K)):
            arm = [r for r in members if r['K'] == K]
            if baseline and arm:
                found.append({'part': key[0], 'condition': key[1], 'dataset': key[2], 'train_size': key[3],
                              'setting': dict(zip(SETTING, key[4:-1])), 'pack': key[-1], 'K': K,
                              'arm': arm[0]['arm'], 'baseline': baseline, 'treated': arm})
    return found


def judge(cell, claim):
    """The cell's effect, interval and verdict for a claim; None where its runs lack the metric."""
    metric = metric_of(claim, cell['dataset'])
    treated, baseline = ([value(r, metric) for r in cell[arm]] for arm in ('treated', 'baseline'))
    if any(math.isnan(v) for v in treated + baseline):
        return None
    effect, low, high = bootstrap(treated, baseline)
    result = {'effect': effect, 'low': low, 'high': high, 'verdict': verdict(claim, effect, low, high),
              'treated': treated, 'baseline': baseline}
    if claim == 'gam2':  # the paper's condition for GAM: judges equally strict on held-out real data
        result['judges'] = real_errors(cell)
        result['verdict'] = judges_differ(result['judges'], 'for K=0') or result['verdict']
    return result


def real_errors(cell):
    """How each arm's judges reject held-out real data: (baseline's mean, treated's mean, the 95% interval of their
    difference)."""
    real = [[value(r, 'd_real_error') for r in cell[arm]] for arm in ('treated', 'baseline')]
    _, low, high = bootstrap(*real)
    return float(np.mean(real[1])), float(np.mean(real[0])), low, high


def judges_differ(judges, baseline_name):
    """GAM-II's 'no verdict' where the two arms' judges (real_errors) differ detectably, else None."""
    baseline, treated, low, high = judges
    return None if low <= 0 <= high else (f'no verdict: the judges differ (held-out real error {baseline:.2f} '
                                          f'{baseline_name} against {treated:.2f})')


# the secondary GAM-II analysis (set after the primary rule, see EQUIVALENCE_NOTE): the judges are taken as comparable
# where the 90% interval of the ratio of their held-out real errors (K>0 / K=0) lies inside this margin
EQUIVALENCE_MARGIN = (0.9, 1.1)
EQUIVALENT = 'secondary: judges equivalent within 10%'


def ratio_interval(treated, baseline, resamples=RESAMPLES):
    """(ratio, low, high): mean(treated) / mean(baseline) and its 90% percentile interval, resampling each arm's
    seeds with replacement as bootstrap() does. Inside a margin, the interval is an equivalence test at the 5% level
    (two one-sided tests)."""
    a, b = np.asarray(treated, float), np.asarray(baseline, float)
    rng = np.random.default_rng(0)
    ratios = (a[rng.integers(0, len(a), (resamples, len(a)))].mean(1)
              / b[rng.integers(0, len(b), (resamples, len(b)))].mean(1))
    low, high = np.percentile(ratios, [5, 95])
    return float(a.mean() / b.mean()), float(low), float(high)


def equivalence(cell):
    """The secondary GAM-II verdict of a cell: the judges' held-out real error ratio and its 90% interval; where that
    interval lies inside EQUIVALENCE_MARGIN, the pool's verdict marked EQUIVALENT, else 'no verdict'. Beside it the
    primary (pre-registered) verdict. None where the cell's runs lack the pool's numbers."""
    pool = judge(cell, 'gam2')
    if pool is None:
        return None
    errors = ([value(r, 'd_real_error') for r in cell[arm]] for arm in ('treated', 'baseline'))
    ratio, low, high = ratio_interval(*errors)
    inside = EQUIVALENCE_MARGIN[0] <= low and high <= EQUIVALENCE_MARGIN[1]
    pools_verdict = verdict('gam2', pool['effect'], pool['low'], pool['high'])
    return {'ratio': ratio, 'low': low, 'high': high, 'pool': pool, 'primary': pool['verdict'],
            'secondary': f'{pools_verdict} ({EQUIVALENT})' if inside else 'no verdict'}


def changed(e):
    """How the secondary verdict stands to the primary: 'gains a verdict', 'loses its verdict' or ''."""
    primary_has = not e['primary'].startswith('no verdict')
    secondary_has = e['secondary'] != 'no verdict'
    return 'gains a verdict' if secondary_has and not primary_has else \
        'loses its verdict' if primary_has and not secondary_has else ''


def data_name(cell):
    return DATA_NAMES.get((cell['dataset'], cell['train_size']), f'{cell["dataset"]}, {cell["train_size"]}')


def interval(r, fmt='.3g'):
    return f'{r["effect"]:+{fmt}} [{r["low"]:+{fmt}}, {r["high"]:+{fmt}}]'


def study_cells(runs):
    """The main study's comparisons (the script's and the paper's conditions; the robustness and ablation parts
    aside, and a part whose successor has runs), primary K first."""
    have = {r['part'] for r in runs}
    aside = {*ROBUSTNESS_PARTS, *RERUNS, *PACKING, *(old for old, new in SUPERSEDED.items() if new in have)}
    return [c for c in cells(runs) if c['part'] not in aside and c['condition'] in CONDITION_NAMES]


def answer_table(runs, headline=('r15', 100)):
    """The first screen's table: per claim and condition, how many data sets say what, and one data set's effect."""
    lines = ['| claim | ' + ' | '.join(CONDITION_NAMES[c] for c in CONDITION_NAMES) + ' |', '|---|---|---|']
    found = [c for c in study_cells(runs) if c['arm'] == 'primary']
    for claim, (name, *_) in CLAIMS.items():
        row = []
        for condition in CONDITION_NAMES:
            mine = [(c, judge(c, claim)) for c in found if c['condition'] == condition]
            mine = [(c, r) for c, r in mine if r]
            if not mine:
                row.append('not yet run')
                continue
            counts = defaultdict(int)
            for _, r in mine:
                counts[r['verdict'].split(' (')[0].replace('no verdict: the judges differ', 'no verdict')] += 1
            summary = ', '.join(f'**{word}** on {n}' for word, n in sorted(counts.items(), key=lambda kv: -kv[1]))
            shown = next(((c, r) for c, r in mine if (c['dataset'], c['train_size']) == headline), mine[0])
            row.append(f'{summary} of {len(mine)}; {data_name(shown[0])}: {interval(shown[1])}')
        lines.append(f'| {name.split(" (")[0]} | ' + ' | '.join(row) + ' |')
    return '\n'.join(lines)


def verdict_table(runs, arm='primary'):
    """Every claim x data set x condition at the verdict's K (arm='primary') or at the secondary K: seeds, K=0's
    mean, the effect, its interval and the verdict."""
    lines = ['| claim | condition | data | K | seeds (K=0 / K) | K=0 mean | effect [95% interval] | verdict |',
             '|---|---|---|---|---|---|---|---|']
    for claim, (name, *_) in CLAIMS.items():
        for c in study_cells(runs):
            r = judge(c, claim) if c['arm'] == arm else None
            if r:
                lines.append(f'| {name.split(" (")[0]} | {c["condition"]} | {data_name(c)} | {c["K"]} | '
                             f'{len(r["baseline"])} / {len(r["treated"])} | {np.mean(r["baseline"]):.3g} | '
                             f'{interval(r)} | {r["verdict"]} |')
    return '\n'.join(lines)


def detail_table(runs, metrics=('modes', 'modes_captured', 'high_quality', 'score', 'fd', 'pool_error', 'd_real_error',
                                'd_gap', 'd_acc_gap')):
    """Per part and K: seeds and mean ± std over seeds of every metric its runs have."""
    lines = []
    varied = ('robust_r15', STACKED_TUNE)  # their settings vary
    for part in dict.fromkeys(r['part'] for r in runs if r['part'] not in varied):
        mine = [r for r in runs if r['part'] == part]
        shown = [m for m in (*metrics, *(('kl',) if part in STACKED_PARTS else ())) if not any(math.isnan(value(r, m))
                                                                                             for r in mine)]
        what = part_description(part)
        lines += [f'\n### {part}' + (f': {what}' if what else '') + '\n',
                  '| K | seeds | ' + ' | '.join(shown) + ' |', '|---' * (2 + len(shown)) + '|']
        for K in sorted({r['K'] for r in mine}):
            arm = [r for r in mine if r['K'] == K]
            cells_ = [f'{np.mean(v):.3g} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.2g}'
                      for v in ([value(r, m) for r in arm] for m in shown)]
            lines.append(f'| {K} | {len(arm)} | ' + ' | '.join(cells_) + ' |')
    return '\n'.join(lines).lstrip('\n')


def part_description(part):
    """What a part is, as study/sweep.py describes it ('' for a part it does not know)."""
    try:
        import sweep
    except ImportError:
        return ''
    return sweep.PARTS[part][0] if part in sweep.PARTS else ''


def robustness_cells(runs):
    """R15's coverage comparisons at every setting of the robustness check: its own runs, and the study's setting
    from the r15 parts' seeds 0 to 4."""
    study = [r for r in runs if r['part'] in ('r15_script', 'r15_paper') and r['seed'] < 5 and r['K'] in (0, 2)]
    found = [c for c in cells(study + [r for r in runs if r['part'] == 'robust_r15']) if c['K'] == 2]
    return sorted(found, key=lambda c: (c['condition'] != 'script', [float(c['setting'][k]) for k in SETTING]))


def robustness_table(runs):
    lines = ['| condition | lr | h_dim | z_dim | seeds | modes captured, K=0 | effect of K=2 [95% interval] '
             '| verdict |',
             '|---|---|---|---|---|---|---|---|']
    for c in robustness_cells(runs):
        r = judge(c, 'coverage')
        s = c['setting']
        lines.append(f'| {c["condition"]} | {float(s["lr"]):g} | {s["h_dim"]} | {s["z_dim"]} | {len(r["treated"])} | '
                     f'{np.mean(r["baseline"]):.2f} | {interval(r)} | {r["verdict"]} |')
    return '\n'.join(lines)


def arm_of_part(runs, part, K):
    return [r for r in runs if r['part'] == part and r['K'] == K]


def alone_cells(runs):
    """The comparisons of "each of the paper's conditions alone" (ALONE's rows, in its order): (data, condition,
    cell), the cell None where its part or its K=0 part is not in the CSV yet."""
    found = []
    for data, condition, part, K, baseline_part in ALONE:
        baseline_part = part if arm_of_part(runs, part, 0) else baseline_part  # its own K=0 runs, where it has them
        treated, baseline = arm_of_part(runs, part, K), arm_of_part(runs, baseline_part, 0)
        cell = None
        if treated and baseline:
            for r in treated + baseline:  # a K=0 part borrowed from another must hold the same setting
                mismatched = [k for k in ('dataset', 'train_size', *SETTING) if r[k] != treated[0][k]]
                if mismatched:
                    raise ValueError(f'{part} against the K=0 runs of {baseline_part}: their '
                                     f'{", ".join(mismatched)} differ')
            cell = {'part': part, 'baseline_part': baseline_part, 'condition': treated[0]['condition'],
                    'dataset': treated[0]['dataset'], 'train_size': treated[0]['train_size'],
                    'setting': {k: treated[0][k] for k in SETTING}, 'K': K, 'arm': treated[0]['arm'],
                    'baseline': baseline, 'treated': treated}
        found.append((data, condition, cell))
    return found


def alone_table(runs):
    """Each of the paper's conditions alone on top of the script's (R15 with 100 points, and batch norm on 1,000
    MNIST images), beside none and all six: per row the effect of swapping on coverage, on the D(x) gap and on
    GAM-II's error rate, each with its interval and verdict."""
    lines = ['| data | condition | K | seeds (K=0 / K) | modes captured (R15) or classes (MNIST), K=0 '
             '| effect [95% interval] | verdict | D(x) gap, K=0 | effect [95% interval] | verdict | GAM-II, K=0 '
             '| effect [95% interval] | verdict |',
             '|---' * 13 + '|']
    for data, condition, c in alone_cells(runs):
        K = next(k for d, cond, _, k, _ in ALONE if (d, cond) == (data, condition))
        if c is None:
            lines.append(f'| {data} | {condition} | {K} | not run yet |' + '  |' * 9)
            continue
        borrowed = f' ({c["baseline_part"]})' if c['baseline_part'] != c['part'] else ''
        row = [data, condition, str(K), f'{len(c["baseline"])}{borrowed} / {len(c["treated"])}']
        for claim, fmt in (('coverage', '.2f'), ('generalisation', '.3g'), ('gam2', '.3g')):
            r = judge(c, claim)
            row += ([f'{np.mean(r["baseline"]):{fmt}}', interval(r, '.3g'), r['verdict']] if r else ['-', '-', '-'])
        lines.append('| ' + ' | '.join(row) + ' |')
    return '\n'.join(lines)


def own_baseline_note(runs, part='r15_swap_matching', borrowed='r15_script'):
    """Where a part whose K=0 is borrowed has K=0 runs of its own: how many of them match the borrowed ones seed by
    seed (modes captured and D(x) gap). '' where it has none."""
    own = {r['seed']: r for r in arm_of_part(runs, part, 0)}
    if not own:
        return ''
    theirs = {r['seed']: r for r in arm_of_part(runs, borrowed, 0)}
    same = sum(s in theirs and all(value(r, m) == value(theirs[s], m) for m in ('modes_captured', 'd_gap'))
               for s, r in own.items())
    return (f'{part} holds K=0 runs of its own (the same settings as {borrowed}\'s, which ran on older code): {same} '
            f'of {len(own)} give the same modes captured and D(x) gap as {borrowed}\'s K=0 run of the same seed. The '
            f'table compares its K=2 runs with its own K=0 runs, made by the same code.')


def bimodal_table(runs, part=BIMODAL):
    """The robustness check's bimodal cell (the paper's conditions, lr 2e-4, h_dim 128, z_dim 2) with 20 seeds per
    arm: per claim the seeds, each arm's mean, the effect, its interval and the verdict; then every seed's modes
    captured. None where the part is not in the CSV yet."""
    found = [c for c in cells([r for r in runs if r['part'] == part]) if c['arm'] == 'primary']
    if not found:
        return None
    c = found[0]
    lines = [f'| claim | seeds (K=0 / K={c["K"]}) | K=0 mean | K={c["K"]} mean | effect [95% interval] | verdict |',
             '|---|---|---|---|---|---|']
    for claim, (name, *_) in CLAIMS.items():
        r = judge(c, claim)
        if r:
            lines.append(f'| {name.split(" (")[0]} | {len(r["baseline"])} / {len(r["treated"])} | '
                         f'{np.mean(r["baseline"]):.3g} | {np.mean(r["treated"]):.3g} | {interval(r)} | '
                         f'{r["verdict"]} |')
    seeds = {arm: ', '.join(f'{v:g}' for v in sorted(value(r, 'modes_captured') for r in c[arm]))
             for arm in ('baseline', 'treated')}
    lines.append(f'\nModes captured, every seed in order: K=0: {seeds["baseline"]}; K={c["K"]}: {seeds["treated"]}.')
    looked = sorted({int(r['seed']) for r in runs if r['part'] == 'robust_r15'})  # the look that picked this cell
    unseen = {arm: [r for r in c[arm] if int(r['seed']) not in looked] for arm in ('baseline', 'treated')}
    r = judge({**c, **unseen}, 'coverage')
    if r and looked and unseen['baseline']:
        lines.append(f'On the seeds the robustness check that picked this cell did not run ({len(r["baseline"])} / '
                     f'{len(r["treated"])}; it ran seeds {looked[0]}-{looked[-1]}): mode coverage {interval(r)}, '
                     f'{r["verdict"]}.')
    return '\n'.join(lines)


def setting_name(cell):
    s = cell['setting']
    return f'lr {float(s["lr"]):g}, h_dim {s["h_dim"]}, z_dim {s["z_dim"]}'


def equivalence_table(runs):
    """Every cell of the CSV (every part, K and setting): the judges' held-out real errors, their ratio with its 90%
    interval, GAM-II's effect, the primary verdict, the secondary verdict and whether it differs."""
    lines = ['| part | data | setting | K | seeds (K=0 / K) | judges\' held-out real error, K=0 / K | ratio [90% '
             'interval] | GAM-II effect [95% interval] | primary verdict | secondary verdict | changes |',
             '|---' * 11 + '|']
    for c in cells(runs):
        e = equivalence(c)
        if e:
            errors = ' / '.join(f'{np.mean([value(r, "d_real_error") for r in c[arm]]):.3f}'
                                for arm in ('baseline', 'treated'))
            lines.append(f'| {c["part"]} | {data_name(c)} | {setting_name(c)} | {c["K"]} | {len(c["baseline"])} / '
                         f'{len(c["treated"])} | {errors} | {e["ratio"]:.3f} [{e["low"]:.3f}, {e["high"]:.3f}] | '
                         f'{interval(e["pool"])} | {e["primary"]} | {e["secondary"]} | {changed(e) or "-"} |')
    return '\n'.join(lines)


def equivalence_changes(runs):
    """One paragraph: the cells (with the pool's numbers) whose secondary verdict differs from the primary one."""
    found = defaultdict(list)
    for c in cells(runs):
        e = equivalence(c)
        if e and changed(e):
            shown = e['secondary'] if changed(e) == 'gains a verdict' else e['primary']
            found[changed(e)].append(f'{c["part"]} (K={c["K"]}: {shown})')
    gained, lost = found['gains a verdict'], found['loses its verdict']
    return (f'Of the {sum(1 for c in cells(runs) if equivalence(c))} cells with the pool\'s numbers, '
            f'{len(gained)} gain a secondary verdict{": " + "; ".join(gained) if gained else ""}. '
            f'{len(lost)} have a primary verdict that the secondary analysis cannot back, their judges not shown '
            f'equivalent (the primary verdict stands){": " + "; ".join(lost) if lost else ""}.')


EQUIVALENCE_NOTE = """\
A labelled secondary analysis, beside the pre-registered rule, which stays as it was. The primary rule gives "no
verdict" wherever the 95% interval of the difference of the two arms' held-out real errors excludes 0: a test of
difference, which with thousands of held-out points calls tiny gaps significant. The paper asks that the judges be
comparable (r_test ≈ 1), a question of equivalence. Here the judges count as equivalent where the 90% bootstrap
interval of the ratio of their held-out real errors (K>0 over K=0, the arms' means over seeds) lies inside [0.9, 1.1]
(two one-sided tests at the 5% level, a ±10% margin); there the cell gets the verdict its pool gives, marked
"secondary: judges equivalent within 10%"; elsewhere "no verdict". **The margin was set after the primary rule and
after its results were seen** (issue 38: on full MNIST under the script's conditions the judges' errors were 0.219
and 0.238, a ratio of 0.92 taken the other way up, and the primary rule gave no verdict); ±10% is a judgement of how
much more one arm's judges may reject before their verdicts stop being comparable, not a pre-registered number. A
cell gains a verdict only where the primary rule gave none and the judges are shown equivalent; where the primary
rule gave a verdict and the judges are not shown equivalent, the primary verdict stands and the secondary says
"no verdict"."""


STACKED_TUNE, STACKED_PARTS = 'stacked_tune', ('stacked_script', 'stacked_paper', 'stacked_script_long')
# Stacked MNIST's claims: (name, metric, +1 where higher is better for GAP, what better/worse say)
STACKED_CLAIMS = [('modes (published: distinct triples of 1,000)', 'modes', +1, ('more modes', 'fewer modes')),
                  ('KL(triples ‖ uniform)', 'kl', -1, ('lower KL', 'higher KL')),
                  ('high-confidence modes (3 channels >= 0.9)', 'modes_captured', +1, ('more modes', 'fewer modes')),
                  ('share of high-confidence samples', 'high_quality', +1, ('more', 'fewer')),
                  ('D(x) gap, train - held-out', 'd_gap', -1, ('smaller gap', 'larger gap')),
                  ('GAM-II pool error', 'pool_error', +1, ('fools the pool more', 'fools the pool less'))]
STACKED_CHOICE = """\
**The setting, chosen before any K>0 run** (stacked_tune: K=0 alone under the script's conditions, seeds 0 and 1;
every run 3,001 iterations of 32 examples, 4 pairs, evaluated once at its end on 26,000 samples per generator).
The criterion, fixed before the tuning ran: the most high-confidence modes (mean over the 2 seeds' generators),
since the published mode count also counts garbage; ties by KL. The choice: see the tuning table and the line
under it."""
STACKED_CHOSEN = """\
**Chosen: h_dim 128, lr 2e-4** (written after the 8 tuning runs, before any K>0 run). No setting made a single
high-confidence sample at this length (every generator still draws blurred, noisy blobs; the published count
comes from the classifier's guesses on them), so the criterion's tie-break decides: the lowest KL, 6.14 against
6.32 to 6.50, which is also the most modes (13 against 4 to 8) and the lowest Frechet distance (1,214 against
1,241 to 1,342). The K runs use it under both conditions. What this means for the comparison: at 3,001 iterations
on one CPU thread no arm is near the published networks; the cells test whether swapping changes collapse this
early, not GAP at convergence."""  # the choice and why, written once the tuning runs are in, before the K runs


def stacked_tuning_table(runs):
    """stacked_tune's runs per (h_dim, lr): seeds and the mean of each Stacked MNIST metric. None before its runs."""
    mine = [r for r in runs if r['part'] == STACKED_TUNE]
    if not mine:
        return None
    lines = ['| h_dim | lr | seeds | ' + ' | '.join(m for _, m, *_ in STACKED_CLAIMS[:5]) + ' |', '|---' * 8 + '|']
    for h, lr in dict.fromkeys((r['h_dim'], r['lr']) for r in mine):
        arm = [r for r in mine if (r['h_dim'], r['lr']) == (h, lr)]
        means = [f'{np.mean([value(r, m) for r in arm]):.3g}' for _, m, *_ in STACKED_CLAIMS[:5]]
        lines.append(f'| {h} | {float(lr):g} | {len(arm)} | ' + ' | '.join(means) + ' |')
    return '\n'.join(lines)


def stacked_table(runs):
    """Per Stacked MNIST cell and claim: the seeds, each arm's mean, the effect, its interval and the verdict
    (GAM-II's as judge() gives it: no verdict where the two arms' judges differ on held-out real data)."""
    lines = ['| condition | claim | seeds (K=0 / K) | K=0 mean | K mean | effect [95% interval] | verdict |',
             '|---|---|---|---|---|---|---|']
    for c in (c for c in cells(runs) if c['part'] in STACKED_PARTS):
        for name, metric, better, words in STACKED_CLAIMS:
            treated, baseline = ([value(r, metric) for r in c[arm]] for arm in ('treated', 'baseline'))
            if any(math.isnan(v) for v in treated + baseline):
                continue
            effect, low, high = bootstrap(treated, baseline)
            said = ('no difference detected' if low <= 0 <= high else
                    f'yes: {words[0]}' if effect * better > 0 else f'no: {words[1]}')
            if metric == 'pool_error':
                said = judge(c, 'gam2')['verdict']
            lines.append(f'| {c["condition"]} (K={c["K"]}) | {name} | {len(baseline)} / {len(treated)} | '
                         f'{np.mean(baseline):.3g} | {np.mean(treated):.3g} | '
                         f'{interval({"effect": effect, "low": low, "high": high})} | {said} |')
    return '\n'.join(lines) if len(lines) > 2 else None


def parts_table(runs):
    """Every part of the CSV: what it is, its runs and the commit that produced its rows."""
    lines = ['| part | what | runs | commit |', '|---|---|---|---|']
    for part in dict.fromkeys(r['part'] for r in runs):
        mine = [r for r in runs if r['part'] == part]
        commits = ', '.join(dict.fromkeys(r['commit'] or 'not recorded' for r in mine))
        lines.append(f'| {part} | {part_description(part)} | {len(mine)} | {commits} |')
    return '\n'.join(lines)


# the positive control (PacGAN, Lin et al. 2018): each packing part's K=0 runs with D judging packs of two against
# its K=0 runs with D judging single samples, or those of another part (PACKING: part -> where its unpacked K=0 runs
# are; None: in the part itself); and GAP with packs, K>0 against K=0, both packed (cells() of the packing parts)
PACKING = {'r15_pack': None, 'grid25_pack': None, 'ring8_pack': None, 'stacked_pack': 'stacked_script_long'}
# (what, metric on images, on 2-D points, +1 where higher is better); GAM-II only where both arms share a pool
CONTROL_CLAIMS = [('modes (2-D: captured; Stacked MNIST: distinct triples)', 'modes', 'modes_captured', +1),
                  ('high-confidence modes (Stacked MNIST)', 'modes_captured', None, +1),
                  ('share of high-quality samples', 'high_quality', 'high_quality', +1),
                  ('KL(modes ‖ uniform)', 'kl', 'kl', -1),
                  ('D(x) gap, train - held-out', 'd_gap', 'd_gap', -1),
                  ('GAM-II pool error', 'pool_error', 'pool_error', +1)]


def control_cells(runs):
    """Per packing part: the unpacked K=0 runs (baseline) and the packed ones (treated), and whether they share a
    pool of discriminators (GAM-II)."""
    found = []
    for part, elsewhere in PACKING.items():
        treated = [r for r in runs if r['part'] == part and r['K'] == 0 and r['pack'] > 1]
        baseline = [r for r in runs if r['part'] == (elsewhere or part) and r['K'] == 0 and r['pack'] == 1]
        if treated and baseline:
            found.append({'part': part, 'dataset': treated[0]['dataset'], 'train_size': treated[0]['train_size'],
                          'pack': treated[0]['pack'], 'baseline': baseline, 'treated': treated,
                          'pooled': elsewhere is None, 'baseline_part': elsewhere or part})
    return found


def control_judgement(cell, name, metric, better):
    """The control's effect (packed - unpacked), interval and verdict in one metric; None where it is not there."""
    if metric is None or metric == 'pool_error' and not cell['pooled']:
        return None
    treated, baseline = ([value(r, metric) for r in cell[arm]] for arm in ('treated', 'baseline'))
    if any(math.isnan(v) for v in treated + baseline):
        return None
    effect, low, high = bootstrap(treated, baseline)
    said = ('no difference detected' if low <= 0 <= high else
            'yes: better with packs' if effect * better > 0 else 'no: worse with packs')
    if metric == 'pool_error':
        said = judges_differ(real_errors(cell), 'unpacked') or said
    return {'effect': effect, 'low': low, 'high': high, 'verdict': said, 'treated': treated, 'baseline': baseline}


def control_table(runs):
    """The positive control: per data set and metric, each arm's mean, the effect of packing and its verdict."""
    lines = ['| data | metric | seeds (unpacked / packed) | unpacked mean | packed mean | effect [95% interval] | '
             'verdict |', '|---|---|---|---|---|---|---|']
    for c in control_cells(runs):
        stacked = c['dataset'] == 'stacked_mnist'
        for name, images, points, better in CONTROL_CLAIMS:
            r = control_judgement(c, name, images if stacked else points, better)
            if r:
                lines.append(f'| {data_name(c)} | {name} | {len(r["baseline"])} / {len(r["treated"])} | '
                             f'{np.mean(r["baseline"]):.3g} | {np.mean(r["treated"]):.3g} | {interval(r)} | '
                             f'{r["verdict"]} |')
        if not c['pooled']:
            lines.append(f'| {data_name(c)} | GAM-II pool error | - | - | - | - | not measured: the unpacked arm is '
                         f'`{c["baseline_part"]}`\'s, pooled apart |')
    return '\n'.join(lines) if len(lines) > 2 else None


def packed_gap_table(runs):
    """GAP with packs: K>0 against K=0, both packed, per claim, beside the same data's cell without packs."""
    lines = ['| data | claim | K | with packs: K=0 mean | effect [95% interval] | verdict | without packs: effect '
             '[95% interval] | verdict |', '|---|---|---|---|---|---|---|---|']
    unpacked = {(c['dataset'], c['train_size'], c['K']): c for c in study_cells(runs)
                if c['condition'] == 'script' and c['arm'] == 'primary'}
    for c in (c for c in cells(runs) if c['part'] in PACKING and c['pack'] > 1):
        plain = unpacked.get((c['dataset'], c['train_size'], c['K']))
        for claim, (name, *_) in CLAIMS.items():
            r, p = judge(c, claim), judge(plain, claim) if plain else None
            if r:
                lines.append(f'| {data_name(c)} | {name.split(" (")[0]} | {c["K"]} | {np.mean(r["baseline"]):.3g} | '
                             f'{interval(r)} | {r["verdict"]} | {interval(p) if p else "-"} | '
                             f'{p["verdict"] if p else "-"} |')
    return '\n'.join(lines) if len(lines) > 2 else None


def detectable_table(runs):
    """For each GAP cell with no difference detected, on a data set the control ran on for as many iterations: the
    smallest effect the cell could have detected (its interval's half-width) beside packing's effect on the same
    data and metric, and their ratio where packing helped."""
    control = {(c['dataset'], c['train_size']): c for c in control_cells(runs)}
    lines = ['| claim | condition | data | K | GAP: effect [95% interval] | half-width | packing: effect [95% '
             'interval] | packing\'s gain / half-width |', '|---|---|---|---|---|---|---|---|']
    for claim, (name, *_) in CLAIMS.items():
        for c in study_cells(runs):
            here = control.get((c['dataset'], c['train_size']))
            here = here if here and here['treated'][0]['iterations'] == c['treated'][0]['iterations'] else None
            r = judge(c, claim) if c['arm'] == 'primary' and here else None
            if not r or r['verdict'] != 'no difference detected':
                continue
            metric = metric_of(claim, c['dataset'])
            better = next(b for _, images, points, b in CONTROL_CLAIMS
                          if (images if c['dataset'] == 'stacked_mnist' else points) == metric)
            p = control_judgement(here, name, metric, better)
            half = (r['high'] - r['low']) / 2
            helped = p and half > 0 and p['verdict'].startswith('yes')
            ratio = f'{abs(p["effect"]) / half:.2g}' if helped else '-'
            lines.append(f'| {name.split(" (")[0]} | {c["condition"]} | {data_name(c)} | {c["K"]} | {interval(r)} | '
                         f'{half:.3g} | {interval(p) if p else "not measured"} | {ratio} |')
    return '\n'.join(lines) if len(lines) > 2 else None


def pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def forest_plot(runs, path):
    """Every claim x data set x condition (primary K): the effect and its interval, the zero line marked."""
    plt = pyplot()
    found = [c for c in study_cells(runs) if c['arm'] == 'primary']
    fig, axes = plt.subplots(1, len(CLAIMS), figsize=(4.2 * len(CLAIMS), 0.42 * max(len(found), 4) + 1.2), sharey=True)
    labels = [f'{data_name(c)}, {c["condition"]} (K={c["K"]})' for c in found]
    for ax, (claim, (name, _, _, better, words)) in zip(axes, CLAIMS.items()):
        for y, c in enumerate(found):
            r = judge(c, claim)
            if r is None:
                continue
            decided = not r['low'] <= 0 <= r['high'] and not r['verdict'].startswith('no verdict')
            colour = ('tab:green' if r['effect'] * better > 0 else 'tab:red') if decided else 'grey'
            ax.errorbar(r['effect'], y, xerr=[[r['effect'] - r['low']], [r['high'] - r['effect']]], fmt='o',
                        color=colour, capsize=3)
        ax.axvline(0, color='black', lw=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(f'K>0 minus K=0 (GAP better: {"right" if better > 0 else "left"})', fontsize=8)
    axes[0].set_yticks(range(len(found)), labels, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle('Effect of swapping, 95% bootstrap interval over seeds (green: GAP better, red: worse, grey: no '
                 'difference detected or no verdict)', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    fig.savefig(path.replace('.png', '_small.png'), dpi=48)  # for the first screen
    plt.close(fig)


def seeds_plot(runs, claim, path):
    """Every seed's value as a dot, K=0 beside each K>0, per data set and condition."""
    plt = pyplot()
    found = study_cells(runs)
    parts = list(dict.fromkeys((c['part'], data_name(c), c['condition']) for c in found))
    fig, axes = plt.subplots(1, len(parts), figsize=(2.1 * len(parts) + 0.6, 3.3), squeeze=False)
    jitter = np.random.default_rng(0)
    for ax, (part, data, condition) in zip(axes[0], parts):
        mine = [c for c in found if c['part'] == part]
        arms = [('K=0', mine[0]['baseline'])] + [(f'K={c["K"]}', c['treated']) for c in mine]
        metric = metric_of(claim, mine[0]['dataset'])
        for x, (label, arm) in enumerate(arms):
            values = [value(r, metric) for r in arm]
            ax.scatter(x + jitter.uniform(-0.12, 0.12, len(values)), values, s=14, color=f'C{x}', alpha=0.8)
            ax.hlines(np.mean(values), x - 0.3, x + 0.3, color='black', lw=1.2)
        ax.set_xticks(range(len(arms)), [label for label, _ in arms], fontsize=8)
        ax.set_xlim(-0.6, len(arms) - 0.4)
        ax.set_title(f'{data}\n{CONDITION_NAMES[condition]}', fontsize=8)
        ax.set_ylabel(metric, fontsize=8)
    fig.suptitle(f'{CLAIMS[claim][0]}: every seed (dots) and the mean (bar)', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def figures(runs, folder):
    """The forest plot (and a small copy) and one per-seed figure per claim, as PNGs in folder. Returns their paths."""
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, 'study_forest.png'), os.path.join(folder, 'study_forest_small.png')]
    forest_plot(runs, paths[0])
    for claim in CLAIMS:
        paths.append(os.path.join(folder, f'study_seeds_{claim}.png'))
        seeds_plot(runs, claim, paths[-1])
    return paths


METRICS = """\
- **Modes captured** (`modes_captured`, 2-D data): the mixture's modes nearest to at least one high-quality sample
  (one within 3 standard deviations of its nearest mode). Higher is better.
- **Modes** (`modes`): on MNIST the classes covered (by the classifier's label), on 2-D data the modes covered by
  the high-quality samples, each with at least a third of its fair share of the samples. Higher is better.
- **High quality** (`high_quality`, 2-D data): the share of samples within 3 standard deviations of their nearest
  mode. Higher is better.
- **Score** (`score`, MNIST): the classifier score, exp of the mean KL divergence of each sample's class
  probabilities from their average. Higher is better.
- **Fréchet distance** (`fd`): between the samples and real data (MNIST: the classifier's features; 2-D: the
  points). Lower is better.
- **GAM-II pool error** (`pool_error`): the share of a generator's samples that a pool of every run's
  discriminators (all of one part's runs, by `--compare`) takes for real. Higher means the generator fools the
  pool more, which is better for the generator.
- **The judges' error on held-out real data** (`d_real_error`): the share of held-out real examples that the
  discriminator which started in the generator's pair rejects. Neither direction is better for GAP: a GAM-II
  verdict needs the two arms' judges alike in it (where they differ, "no verdict").
- **Generalisation gap** (`d_gap`): mean D(x) on training data minus mean D(x) on held-out data, for the
  discriminator that started in the generator's pair. Smaller is better (the discriminator memorises less).
- **Accuracy gap** (`d_acc_gap`): the share of training data minus the share of held-out data that the same
  discriminator takes for real. Smaller is better."""

PROTOCOL = """\
A run's value is the mean of its generators' rows; the effect is mean(K>0) − mean(K=0) over seeds; its 95% interval
a percentile bootstrap over seeds (each arm resampled with replacement, 10,000 times, numpy's `default_rng(0)`); the
verdict says which way where the interval excludes 0, else "no difference detected"."""


def shown_path(path):
    """A path as the results file names it: from the repository's root where it lies inside it."""
    path = os.path.abspath(path)
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


def rerun_table(runs, arm=None):
    """Each part run again by later code (RERUNS) beside the original: per claim and K (only the K of this arm,
    'primary' or 'secondary', where one is given), both effects and verdicts."""
    by_part = defaultdict(list)
    for c in cells(runs):
        by_part[c['part']].append(c)
    lines = ['| part | claim | K | seeds (K=0 / K) | before: effect [95% interval] | verdict | after: effect [95% '
             'interval] | verdict |', '|---' * 8 + '|']
    for again, first in RERUNS.items():
        for before in by_part.get(first, []):
            if arm and before['arm'] != arm:
                continue
            after = next((c for c in by_part.get(again, []) if c['K'] == before['K']), None)
            for claim, (name, *_) in CLAIMS.items():
                old = judge(before, claim)
                new = judge(after, claim) if after else None
                cells_ = [first, name, str(before['K']), f'{len(before["baseline"])} / {len(before["treated"])}',
                          interval(old) if old else '-', old['verdict'] if old else '-',
                          interval(new) if new else 'not run yet', new['verdict'] if new else '']
                lines.append('| ' + ' | '.join(cells_) + ' |')
    return '\n'.join(lines)


def report(runs):
    """Every table of the study that the CSV rebuilds, as markdown."""
    bimodal = bimodal_table(runs)
    note = own_baseline_note(runs)
    return '\n\n'.join([
        '## The answer (primary K per cell)', answer_table(runs),
        "## Each of the paper's conditions alone", "Each condition on top of the script's, K=0 against the verdict's "
        "K, beside none of them (script) and all six (paper); paper_without_batch_norm is all but batch norm. The "
        "last three rows add the authors' code's unstated choices on top of the paper's (hma02/GAN-evaluation: every "
        "pair from the same initial weights, same_init; at a swap only the weights move, each slot keeping its Adam "
        "state, swap_moves='weights'), each alone and both; their K=0 arms are their own (same_init's shares the "
        "authors' code's K=0 runs, which differ from its own only in swap_moves: the same runs).",
        alone_table(runs) + (f'\n\n{note}' if note else ''),
        '## GAM-II: are the judges equivalent? (a secondary analysis)', EQUIVALENCE_NOTE,
        equivalence_table(runs), equivalence_changes(runs),
        '## The bimodal robustness cell with 20 seeds: R15, the paper\'s conditions, lr 2e-4, h_dim 128, z_dim 2',
        bimodal or f'({BIMODAL}: not run yet)',
        "## Every claim, data set and condition at the verdict's K", verdict_table(runs),
        '## Stacked MNIST (issue 39): 1,000 modes, evaluated as published (26,000 samples per generator)',
        STACKED_CHOICE, stacked_tuning_table(runs) or '(stacked_tune: not run yet)',
        STACKED_CHOSEN or '(no choice yet)',
        stacked_table(runs) or '(stacked_script, stacked_paper: not run yet)',
        '## The positive control: PacGAN2 (packs of two) against K=0, the script\'s conditions',
        control_table(runs) or '(the packing parts: not run yet)',
        '## GAP with packs: K>0 against K=0, both packed', packed_gap_table(runs) or '(not run yet)',
        '## What a "no difference detected" could have seen: its interval\'s half-width beside packing\'s effect',
        detectable_table(runs) or '(not run yet)',
        '## The secondary K', verdict_table(runs, 'secondary'),
        '## The R15 parts run again by the plain-PyTorch code', 'The same maths and settings; the runs no longer '
        'repeat bit for bit, so the effects move within their intervals.', rerun_table(runs),
        '## Robustness of the coverage verdicts: R15, K=0 against K=2', robustness_table(runs)
        if any(r['part'] == 'robust_r15' for r in runs) else '(robustness check not run yet)',
        '## Each part: mean ± std over seeds', detail_table(runs),
        '## The parts and the commits that produced them',
        "The commit of the code that ran a part's runs, as study/sweep.py recorded it when it wrote the part's "
        "rows (a '+' where parallel_gan.py differed from it); for the parts written before the CSV had that column, "
        "the commit that first added the part's rows to `study/runs.csv` (their runs ran on that commit's "
        "code or on an earlier commit's).", parts_table(runs)])


def results(runs, source):
    """The whole results file: a header (where it comes from, the metrics, the protocol), every table the CSV
    rebuilds, and the earlier study's tables (study/earlier_study.md, which no CSV rebuilds)."""
    header = (f'# The study\'s results\n\nGenerated by `python study/summarize_runs.py` from '
              f'`{shown_path(source)}` ({sum(len(r["rows"]) for r in runs)} rows: a row per run and generator); '
              f'rerun it rather than edit this file.\n\n## The metrics\n\n{METRICS}\n\n## The protocol\n\n{PROTOCOL}')
    parts = [header, report(runs)]
    if os.path.exists(EARLIER):
        with open(EARLIER) as f:
            parts.append('## The earlier study: 3 seeds on MNIST, 5 on 2-D, judged by whether mean ± std ranges '
                         'overlap\n\nCopied as it is from study/earlier_study.md (its runs were not kept, so '
                         'no CSV rebuilds these tables; they were made by `git show 1d9b8fc:tests/summarize_runs.py`).'
                         '\n\n' + f.read().strip())
    return '\n\n'.join(parts) + '\n'


def write_whole(path, text):
    """text written at path atomically: a temporary file beside it, then renamed over it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def write_results(runs, source, path=RESULTS):
    """The results file written at path atomically (a temporary file beside it, then renamed over it)."""
    return write_whole(path, results(runs, source))


def coverage_table(runs):
    """The project README's headline: mode coverage per data set and condition at the verdict's K (K=0's mean in
    modes captured on 2-D data, classes on MNIST, published modes of 1,000 on Stacked MNIST)."""
    lines = ['| data | condition | K | seeds (K=0 / K) | K=0 mean | effect [95% interval] | verdict |',
             '|---|---|---|---|---|---|---|']
    for c in study_cells(runs):
        r = judge(c, 'coverage') if c['arm'] == 'primary' else None
        if r:
            lines.append(f'| {data_name(c)} | {c["condition"]} | {c["K"]} | {len(r["baseline"])} / '
                         f'{len(r["treated"])} | {np.mean(r["baseline"]):.3g} | {interval(r)} | {r["verdict"]} |')
    return '\n'.join(lines)


def stacked_block(runs):
    """Stacked MNIST's cells (stacked_table) under a line saying what they compare, from the runs themselves."""
    table = stacked_table(runs)
    if table is None:
        return '(stacked_script, stacked_paper: not run yet)'
    found = [c for c in cells(runs) if c['part'] in STACKED_PARTS]
    arms = {}  # K: (iterations, the parts that ran it)
    for c in found:
        arms.setdefault(c['K'], (int(c['treated'][0]['iterations']), []))[1].append(f'`{c["part"]}`')
    said = ' or '.join(f'K={K} ({it:,} iterations: {", ".join(parts)})' for K, (it, parts) in arms.items())
    seeds = sorted({n for c in found for n in (len(c['baseline']), len(c['treated']))})
    pairs = sorted({int(r['n_pairs']) for c in found for r in c['baseline'] + c['treated']})
    return wrapped(f'Per cell, K=0 against {said}, {" to ".join(map(str, seeds))} seeds per arm; a run\'s value is '
                   f'the mean of its {" or ".join(map(str, pairs))} generators; effect, 95% bootstrap interval and '
                   f'verdict as for every other cell ([RESULTS.md](RESULTS.md)):') + f'\n\n{table}'


def alone_block(runs):
    note = own_baseline_note(runs)
    return alone_table(runs) + (f'\n\n{wrapped(note)}' if note else '')


def wrapped(text, width=115):
    """A paragraph in lines of at most width characters, as the READMEs' prose is wrapped."""
    return textwrap.fill(text, width, break_long_words=False, break_on_hyphens=False)


# the READMEs' generated blocks: NAME -> a function of the runs that returns the block's markdown (links in a block
# of study/README.md are relative to study/)
GENERATED = {
    'coverage': coverage_table,  # README.md, "The study"
    'cells': verdict_table,  # study/README.md: every claim x data set x condition at the verdict's K
    'alone': alone_block,  # study/README.md: each of the paper's conditions alone
    'robustness': robustness_table,  # study/README.md: the R15 coverage verdicts at other settings
    'rerun': lambda runs: rerun_table(runs, 'primary'),  # study/README.md: the plain-PyTorch code, run again
    'stacked': stacked_block,  # study/README.md: Stacked MNIST
    'control': control_table,  # study/README.md: the positive control, PacGAN2 against K=0
    'packed_gap': packed_gap_table,  # study/README.md: GAP with packs
    'detectable': detectable_table,  # study/README.md: what a 'no difference' could have seen
}
OPENING = '<!-- generated: {} (rebuilt by study/summarize_runs.py from study/runs.csv) -->'
CLOSING = '<!-- /generated: {} -->'
MARKERS = ('<!-- generated:', '<!-- /generated:')  # how a line that is a marker begins
NAME = re.compile(r'<!-- /?generated: (\S+)')


class BlockError(ValueError):
    """A README's generated blocks do not match GENERATED (said in one line)."""


def rebuilt(text, built, where):
    """text with every generated block's content replaced by built[name]; and the blocks' names, in order."""
    lines, out, names, i = text.split('\n'), [], [], 0
    while i < len(lines):
        line, i = lines[i], i + 1
        out.append(line)
        if not line.startswith(MARKERS):
            continue
        name = NAME.match(line)[1] if NAME.match(line) else 'NAME'
        if line != OPENING.format(name):
            raise BlockError(f'{where}, line {i}: {line!r} {"closes" if line.startswith(MARKERS[1]) else "opens"} no '
                             f'block (a block: {OPENING.format("NAME")} ... {CLOSING.format("NAME")}, each a line)')
        if name not in built:
            raise BlockError(f'{where}, line {i}: block {name!r} has no builder (GENERATED has '
                             f'{", ".join(built) or "none"})')
        end = next((j for j in range(i, len(lines)) if lines[j].startswith(MARKERS)), None)
        if end is None or lines[end] != CLOSING.format(name):
            raise BlockError(f'{where}, line {i}: block {name!r} is not closed by {CLOSING.format(name)} before '
                             f'{"the next marker" if end is not None else "the end"}')
        out += [built[name], lines[end]]
        names.append(name)
        i = end + 1
    return '\n'.join(out), names


def rebuild_readmes(runs, paths=READMES, generated=None):
    """Every generated block of the files at paths rebuilt from the runs; a file whose text changes is rewritten
    atomically. Checks every file before it writes any: a block whose name has no builder, or a builder that no file
    has a block for, raises BlockError. Returns [(path, the names of its blocks, whether it was rewritten)]."""
    generated = GENERATED if generated is None else generated
    built = {name: (build(runs) or '(not run yet)').strip('\n') for name, build in generated.items()}
    found = []
    for path in paths:
        with open(path) as f:
            old = f.read()
        new, names = rebuilt(old, built, shown_path(path))
        found.append((path, names, old, new))
    unused = [name for name in built if not any(name in names for _, names, _, _ in found)]
    if unused:
        raise BlockError(f'no block for the builder{"s" * (len(unused) > 1)} {", ".join(unused)} in '
                         f'{", ".join(shown_path(p) for p in paths) or "no file"}')
    for path, _, old, new in found:
        if new != old:
            write_whole(path, new)
    return [(path, names, new != old) for path, names, old, new in found]


def summary(runs, path):
    """The screen's short summary: the answer, each condition alone, and where every table went."""
    return '\n\n'.join(['## The answer (primary K per cell)', answer_table(runs),
                         "## Each of the paper's conditions alone", alone_table(runs),
                         '## GAM-II: are the judges equivalent? (a secondary analysis)', equivalence_table(runs),
                         equivalence_changes(runs),
                         '## The R15 parts run again by the plain-PyTorch code', rerun_table(runs),
                         f'every table: {shown_path(path)}'])


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('csv', nargs='?', default=STUDY_CSV)
    parser.add_argument('--results', default=RESULTS, help='where every table goes, as markdown (default '
                        'study/RESULTS.md)')
    parser.add_argument('--figures', help='also write the forest plot and per-seed figures into this folder')
    parser.add_argument('--readmes', nargs='*', help='the files whose generated blocks to rebuild (default: README.md '
                        'and study/README.md where the CSV is study/runs.csv, else none)')
    args = parser.parse_args()
    runs = read_runs(args.csv)
    print(summary(runs, write_results(runs, args.csv, args.results)))
    readmes = args.readmes if args.readmes is not None else \
        READMES if os.path.abspath(args.csv) == os.path.abspath(STUDY_CSV) else []
    try:
        for path, names, rewritten in rebuild_readmes(runs, readmes) if readmes else []:
            print(f'{shown_path(path)}: blocks {", ".join(names) or "none"} '
                  f'{"rewritten" if rewritten else "unchanged"}')
    except BlockError as e:
        sys.exit(f'summarize_runs.py: {e}')
    if args.figures:
        for path in figures(runs, args.figures):
            print(f'wrote {path}')
