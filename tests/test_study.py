"""The study's tools: the sweep's parts hold the README's protocol, and tests/summarize_runs.py rebuilds the
tables, intervals, verdicts and figures from a CSV of runs alone."""
import csv
import os
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest

import summarize_runs as summary
import sweep
from conftest import ROOT


def test_every_part_holds_the_protocol():
    """At least 10 seeds per arm for 2-D and 1,000-image MNIST, 5 for full MNIST, 5 for the robustness grid;
    every K>0 arm beside a K=0 arm of the same seeds; run names unique within a part."""
    for part, (_, runs, _) in sweep.PARTS.items():
        names = [name for name, *_ in runs]
        assert len(names) == len(set(names)), part
        least = 5 if part.startswith('mnist_') or part == 'robust_r15' else 10
        arms = {}
        for _, hp, arm, condition in runs:
            assert set(sweep.CONDITIONS[condition].items()) <= set(hp.items()), (part, condition)
            setting = tuple(sorted((k, v) for k, v in hp.items() if k not in ('seed', 'K')))
            arms.setdefault((setting, hp['K'], arm), set()).add(hp['seed'])
        for (setting, K, arm), seeds in arms.items():
            assert len(seeds) >= least, (part, K)
            assert (arm == 'baseline') == (K == 0)
            assert seeds == arms[setting, 0, 'baseline'], (part, K)  # same seeds as K=0


def write_runs(path, arms, metric_values):
    """A study CSV: for each (part, dataset, train_size, condition, K, arm) a run per seed, 2 generators whose
    metrics average to the given value (one generator value + d, the other value - d)."""
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, sweep.COLUMNS)
        writer.writeheader()
        for (part, dataset, train_size, condition, K, arm), values in arms.items():
            for seed, v in enumerate(values):
                for g, d in ((1, 0.5), (2, -0.5)):
                    row = {c: '' for c in sweep.COLUMNS}
                    row.update(part=part, condition=condition, arm=arm, dataset=dataset, train_size=train_size, K=K,
                               seed=seed, lr=1e-3, h_dim=64, z_dim=10, run=f'K{K}-s{seed}', generator=g, iteration=100)
                    row.update({m: fn(v) + d for m, fn in metric_values.items()})
                    writer.writerow(row)


def test_summary_rebuilds_effects_intervals_verdicts_and_figures_from_the_csv(tmp_path):
    path = tmp_path / 'runs.csv'
    arms = {('r15_script', 'r15', 100, 'script', 0, 'baseline'): [8, 9, 7, 8, 8],
            ('r15_script', 'r15', 100, 'script', 2, 'primary'): [3, 4, 3, 5, 4],
            ('mnist1000_paper', 'mnist', 1000, 'paper', 0, 'baseline'): [5, 6, 7, 5, 6],
            ('mnist1000_paper', 'mnist', 1000, 'paper', 16, 'primary'): [5, 7, 6, 6, 5]}
    write_runs(path, arms, {'modes_captured': lambda v: v, 'modes': lambda v: v, 'd_gap': lambda v: v / 100,
                            'pool_error': lambda v: v / 10, 'd_real_error': lambda v: 0.2})
    runs = summary.read_runs(path)
    assert len(runs) == 20 and all(len(r['rows']) == 2 for r in runs)
    found = {c['part']: c for c in summary.cells(runs)}
    r15, mnist = summary.judge(found['r15_script'], 'coverage'), summary.judge(found['mnist1000_paper'], 'coverage')

    # the effect and its interval, computed here the protocol's way
    rng = np.random.default_rng(0)
    a, b = np.array([3., 4, 3, 5, 4]), np.array([8., 9, 7, 8, 8])
    diffs = a[rng.integers(0, 5, (10_000, 5))].mean(1) - b[rng.integers(0, 5, (10_000, 5))].mean(1)
    assert r15['effect'] == pytest.approx(-4.2)
    assert (r15['low'], r15['high']) == pytest.approx(tuple(np.percentile(diffs, [2.5, 97.5])))
    assert r15['verdict'] == 'no: fewer modes' and mnist['verdict'] == 'no difference detected'
    assert mnist['low'] < 0 < mnist['high'] and mnist['effect'] == pytest.approx(0.0)
    gap = summary.judge(found['r15_script'], 'generalisation')
    assert gap['verdict'] == 'yes: smaller gap' and gap['effect'] == pytest.approx(-0.042)
    assert summary.judge(found['r15_script'], 'gam2')['verdict'] == 'no: fools the pool less'

    text = summary.report(runs)
    assert '| mode coverage | **no: fewer modes** on 1 of 1; R15, 100 points: -4.2 [' in text
    assert '**no difference detected** on 1 of 1; MNIST, 1,000: +0 [' in text
    assert '| generalisation | script | R15, 100 points | 2 | 5 / 5 | 0.08 | -0.042 [' in text
    written = summary.figures(runs, str(tmp_path / 'figures'))
    assert [os.path.basename(p) for p in written] == ['study_forest.png', 'study_forest_small.png', 'study_seeds_coverage.png',
                                                       'study_seeds_gam2.png', 'study_seeds_generalisation.png']
    assert all(open(p, 'rb').read(8) == b'\x89PNG\r\n\x1a\n' for p in written)


def test_judges_that_differ_on_real_data_give_no_gam_verdict(tmp_path):
    path = tmp_path / 'runs.csv'
    arms = {('r15_paper', 'r15', 100, 'paper', 0, 'baseline'): [1, 2, 1, 2, 1],
            ('r15_paper', 'r15', 100, 'paper', 2, 'primary'): [6, 7, 6, 7, 6]}
    write_runs(path, arms, {'pool_error': lambda v: v / 10, 'd_real_error': lambda v: v / 10})
    cell, = summary.cells(summary.read_runs(path))
    assert summary.judge(cell, 'gam2')['verdict'].startswith('no verdict: the judges differ')
    assert summary.judge(cell, 'coverage') is None  # no coverage metric in these rows


def test_the_published_csv_regenerates_the_tables():
    """The repository's own study CSV: every row belongs to a known part, and the report builds from it."""
    path = summary.STUDY_CSV
    if not os.path.exists(path):
        pytest.skip('no study CSV in this checkout')
    runs = summary.read_runs(path)
    assert runs and {r['part'] for r in runs} <= set(sweep.PARTS)
    assert '| mode coverage |' in summary.report(runs)
    assert os.path.dirname(path) == os.path.join(ROOT, '.assets')


def test_the_sweep_runs_what_is_missing_resumes_what_stopped_and_publishes_its_rows(tmp_path, monkeypatch, capsys):
    """A tiny part of two runs: one stopped halfway before the sweep (resumed), one never started (run); a second
    sweep runs nothing; the part is pooled with --compare and its rows written, one per run and generator."""
    tiny = dict(n_pairs=2, h_dim=8, mb_size=20, iterations=41, eval_every=40, log_every=20, sample_every=20)
    runs = sweep.cell(tiny, 'script', (5,), range(1), dataset='ring8')
    monkeypatch.setitem(sweep.PARTS, 'tiny', ('a tiny part', runs, True))
    args = SimpleNamespace(study=str(tmp_path / 'study'), jobs=2, data_root='unused', csv=str(tmp_path / 'runs.csv'),
                           classifier_dir=str(tmp_path / 'classifiers'))
    name, hp, *_ = runs[0]
    first = sweep.command({**hp, 'iterations': 21}, os.path.join(args.study, 'tiny', name), args, resume=False)
    assert subprocess.run(first, capture_output=True).returncode == 0  # stopped after iteration 20 of 40
    assert sweep.run_part('tiny', args) == []
    assert '0 of 2 runs done, 2 to run' in capsys.readouterr().out
    log = open(os.path.join(args.study, 'tiny', name, 'log.txt')).read()
    assert 'resumed from' in log and 'after iteration 20' in log
    assert sweep.run_part('tiny', args) == [] and '2 of 2 runs done, 0 to run' in capsys.readouterr().out
    sweep.compare_part('tiny', args)
    sweep.publish('tiny', args)
    rows = list(csv.DictReader(open(args.csv)))
    assert len(rows) == 4 and {r['run'] for r in rows} == {'K0-s0', 'K5-s0'}
    assert all(r['iteration'] == '40' and r['pool_error'] and r['condition'] == 'script' for r in rows)
    assert sum(int(r['best_by_pool']) for r in rows) == 2  # one pick per run
