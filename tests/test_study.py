"""The study's tools (study/): the sweep's parts hold study/README.md's protocol, and study/summarize_runs.py
rebuilds the tables, intervals, verdicts and figures from a CSV of runs alone, into study/RESULTS.md and the
generated blocks of README.md and study/README.md."""
import csv
import hashlib
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import summarize_runs as summary
import sweep
from conftest import ROOT

SUMMARIZE = os.path.join(ROOT, 'study', 'summarize_runs.py')


def test_every_part_holds_the_protocol():
    """At least 10 seeds per arm for 2-D and 1,000-image MNIST, 5 for full MNIST, 5 for the robustness grid;
    every K>0 arm beside a K=0 arm of the same seeds; run names unique within a part. A tuning part (K=0 alone,
    which picks a setting before any comparison) has at most 2 seeds and no K>0 arm."""
    for part, (_, runs, _) in sweep.PARTS.items():
        if part.endswith('_tune'):
            assert {hp['K'] for _, hp, *_ in runs} == {0} and {hp['seed'] for _, hp, *_ in runs} <= {0, 1}, part
            continue
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



def test_a_part_that_shares_its_k0_runs_differs_from_its_twin_in_swap_moves_alone():
    """swap_moves acts at a swap alone, so K=0 runs that differ only in it are the same runs (test_run.py)."""
    for part, twin in sweep.SAME_K0_RUNS.items():
        mine, theirs = ({name: hp for name, hp, *_ in sweep.PARTS[p][1] if hp['K'] == 0} for p in (part, twin))
        assert mine.keys() == theirs.keys() and len(mine) == 10
        for name, hp in mine.items():
            assert {k: v for k, v in hp.items() if k != 'swap_moves'} == \
                   {k: v for k, v in theirs[name].items() if k != 'swap_moves'}

def write_runs(path, arms, metric_values, columns=sweep.COLUMNS, commit='abc1234'):
    """A study CSV: for each (part, dataset, train_size, condition, K, arm) a run per seed, 2 generators whose
    metrics average to the given value (one generator value + d, the other value - d)."""
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, columns, extrasaction='ignore')
        writer.writeheader()
        for (part, dataset, train_size, condition, K, arm), values in arms.items():
            for seed, v in enumerate(values):
                for g, d in ((1, 0.5), (2, -0.5)):
                    row = {c: '' for c in columns}
                    row.update(part=part, condition=condition, arm=arm, dataset=dataset, train_size=train_size, K=K,
                               seed=seed, lr=1e-3, h_dim=64, z_dim=10, run=f'K{K}-s{seed}', generator=g, iteration=100,
                               commit=commit)
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
    assert '| r15_script | R15, 100 points, the script\'s conditions | 10 | abc1234 |' in text  # the part's commit
    written = summary.figures(runs, str(tmp_path / 'figures'))
    assert [os.path.basename(p) for p in written] == ['study_forest.png', 'study_forest_small.png',
                                                       'study_seeds_coverage.png', 'study_seeds_gam2.png',
                                                       'study_seeds_generalisation.png']
    assert all(open(p, 'rb').read(8) == b'\x89PNG\r\n\x1a\n' for p in written)


R15_ARMS = {('r15_script', 'r15', 100, 'script', 0, 'baseline'): [8, 9, 7, 8, 8],
            ('r15_script', 'r15', 100, 'script', 2, 'primary'): [3, 4, 3, 5, 4],
            ('r15_swap_matching', 'r15', 100, 'swap_matching', 2, 'primary'): [4, 5, 4, 4, 5]}
R15_METRICS = {'modes_captured': lambda v: v, 'modes': lambda v: v, 'd_gap': lambda v: v / 100,
               'pool_error': lambda v: v / 10, 'd_real_error': lambda v: 0.2}


def test_each_condition_alone_pairs_the_matching_swap_with_a_k0_arm(tmp_path):
    """r15_swap_matching with only K=2 runs: its row compares them with r15_script's K=0 runs (and says so); with
    K=0 runs of its own, with those. A condition whose part is not in the CSV yet is a row that says so."""
    path = tmp_path / 'runs.csv'
    write_runs(path, R15_ARMS, R15_METRICS)
    runs = summary.read_runs(path)
    found = {condition: cell for _, condition, cell in summary.alone_cells(runs)}
    cell = found['swap_matching alone']
    assert {r['part'] for r in cell['baseline']} == {'r15_script'} and [r['K'] for r in cell['baseline']] == [0] * 5
    assert {r['part'] for r in cell['treated']} == {'r15_swap_matching'} and len(cell['treated']) == 5
    # K=2 of the swap rule - the script's K=0
    assert summary.judge(cell, 'coverage')['effect'] == pytest.approx(4.4 - 8)
    assert found['own_noise alone'] is None and found['paper (all six)'] is None
    table = summary.alone_table(runs)
    assert '| R15, 100 points | swap_matching alone | 2 | 5 (r15_script) / 5 | 8.00 | -3.6 [' in table
    assert '| R15, 100 points | script (none of the six) | 2 | 5 / 5 | 8.00 | -4.2 [' in table
    assert '| R15, 100 points | own_noise alone | 2 | not run yet |' in table
    assert '| MNIST, 1,000 | batch_norm alone | 16 | not run yet |' in table
    assert len(table.splitlines()) == 2 + len(summary.ALONE)
    assert all(line.count('|') == 14 for line in table.splitlines())  # 13 columns: coverage, gap and GAM-II
    assert '| GAM-II, K=0 |' in table and 'fools the pool' in table
    assert summary.own_baseline_note(runs) == ''

    # with K=0 runs of its own (made by the same code as its K=2 runs) it compares with those, and a note says how
    # many repeat the script's K=0 runs seed by seed
    write_runs(path, {**R15_ARMS, ('r15_swap_matching', 'r15', 100, 'swap_matching', 0, 'baseline'): [8, 9, 7, 1, 1]},
               R15_METRICS)
    runs = summary.read_runs(path)
    cell = next(c for _, condition, c in summary.alone_cells(runs) if condition == 'swap_matching alone')
    assert {r['part'] for r in cell['baseline']} == {'r15_swap_matching'}
    assert summary.judge(cell, 'coverage')['effect'] == pytest.approx(4.4 - 5.2)
    assert '| R15, 100 points | swap_matching alone | 2 | 5 / 5 | 5.20 |' in summary.alone_table(runs)
    assert summary.own_baseline_note(runs).startswith('r15_swap_matching holds K=0 runs of its own')
    assert ': 3 of 5 give the same' in summary.own_baseline_note(runs)


def test_the_summary_writes_results_md_and_prints_a_short_summary(tmp_path):
    """The command line: every table into the results file (written whole, nothing left beside it), on the screen
    only the answer, each condition alone and the path; another CSV than the study's rebuilds no README."""
    path, results = tmp_path / 'runs.csv', tmp_path / 'out' / 'RESULTS.md'
    arms = {**R15_ARMS, ('r15_paper_lr2e-4_z2', 'r15', 100, 'paper', 0, 'baseline'): [7, 8, 7, 6, 7, 8],
            ('r15_paper_lr2e-4_z2', 'r15', 100, 'paper', 2, 'primary'): [7, 11, 8, 12, 7, 8]}
    write_runs(path, arms, R15_METRICS)
    readmes = [hashlib.md5(open(p, 'rb').read()).hexdigest() for p in summary.READMES]
    shown = subprocess.run([sys.executable, SUMMARIZE, str(path), f'--results={results}'], capture_output=True,
                           text=True, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert [hashlib.md5(open(p, 'rb').read()).hexdigest() for p in summary.READMES] == readmes
    assert '| mode coverage | **no: fewer modes** on 1 of 1;' in shown.stdout
    assert '| R15, 100 points | swap_matching alone | 2 | 5 (r15_script) / 5 |' in shown.stdout
    assert shown.stdout.rstrip().endswith(f'every table: {results}')
    assert '### r15_script' not in shown.stdout and 'robustness' not in shown.stdout.lower()
    assert os.listdir(results.parent) == ['RESULTS.md']
    text = results.read_text()
    assert text.startswith('# The study\'s results\n\nGenerated by `python study/summarize_runs.py` from '
                           f'`{path}`')
    for sentence in ('Higher means the generator fools the\n  pool more', 'mean D(x) on training data minus mean D(x) '
                     'on held-out data', 'Smaller is better'):
        assert sentence in text
    assert "| R15, 100 points | swap_matching alone | 2 | 5 (r15_script) / 5 |" in text
    assert '### r15_script: R15, 100 points, the script\'s conditions' in text  # a part's detail table
    assert '| mode coverage | 6 / 6 | 7.17 | 8.83 | +1.67 [' in text  # the bimodal cell, 6 seeds here
    assert 'K=0: 6, 7, 7, 7, 8, 8; K=2: 7, 7, 8, 8, 11, 12.' in text
    assert '## The earlier study' in text and '| claim | blog conditions | paper\'s conditions |' in text
    assert text.count('\n## ') >= 10


def test_judges_that_differ_on_real_data_give_no_gam_verdict(tmp_path):
    path = tmp_path / 'runs.csv'
    arms = {('r15_paper', 'r15', 100, 'paper', 0, 'baseline'): [1, 2, 1, 2, 1],
            ('r15_paper', 'r15', 100, 'paper', 2, 'primary'): [6, 7, 6, 7, 6]}
    write_runs(path, arms, {'pool_error': lambda v: v / 10, 'd_real_error': lambda v: v / 10})
    cell, = summary.cells(summary.read_runs(path))
    assert summary.judge(cell, 'gam2')['verdict'].startswith('no verdict: the judges differ')
    assert summary.judge(cell, 'coverage') is None  # no coverage metric in these rows



@pytest.mark.parametrize('real_error, secondary', [
    (lambda v: 0.2 + v / 1000, 'yes: fools the pool more (secondary: judges equivalent within 10%)'),  # ratio 1.02
    (lambda v: 0.2 + v / 100, 'no verdict')], ids=['inside', 'outside'])  # ratio 1.24: outside the margin
def test_gam_ii_judged_a_second_time_where_the_judges_are_equivalent_within_10_percent(tmp_path, real_error, secondary):
    """Judges whose held-out real errors differ by a hair (the primary rule: no verdict) but whose ratio's 90%
    interval lies inside [0.9, 1.1] give the pool's verdict, marked secondary; a ratio outside gives none."""
    path = tmp_path / 'runs.csv'
    arms = {('r15_paper', 'r15', 100, 'paper', 0, 'baseline'): [1, 2, 1, 2, 1],
            ('r15_paper', 'r15', 100, 'paper', 2, 'primary'): [6, 7, 6, 7, 6]}
    write_runs(path, arms, {'pool_error': lambda v: v / 10, 'd_real_error': real_error})
    runs = summary.read_runs(path)
    cell, = summary.cells(runs)
    e = summary.equivalence(cell)
    assert e['primary'].startswith('no verdict: the judges differ') and e['secondary'] == secondary
    assert e['ratio'] == pytest.approx(np.mean([real_error(v) for v in (6, 7, 6, 7, 6)])
                                       / np.mean([real_error(v) for v in (1, 2, 1, 2, 1)]))
    assert e['low'] < e['ratio'] < e['high']
    table = summary.equivalence_table(runs)
    assert f'| {e["ratio"]:.3f} [{e["low"]:.3f}, {e["high"]:.3f}] |' in table and f'| {secondary} |' in table
    gained = secondary != 'no verdict'
    assert f'{int(gained)} gain a secondary verdict' in summary.equivalence_changes(runs)
    assert ('| gains a verdict |' in table) == gained

def test_the_published_csv_regenerates_the_tables():
    """The repository's own study CSV: every row belongs to a known part, and the report builds from it."""
    path = summary.STUDY_CSV
    if not os.path.exists(path):
        pytest.skip('no study CSV in this checkout')
    runs = summary.read_runs(path)
    assert runs and {r['part'] for r in runs} <= set(sweep.PARTS)
    assert '| mode coverage |' in summary.report(runs)
    assert os.path.dirname(path) == os.path.join(ROOT, 'study')
    assert all(r['commit'] for r in runs), 'rows without the commit that produced them'


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


def test_a_part_run_again_by_later_code_stands_beside_the_original_and_stays_out_of_the_answer(tmp_path):
    """r15_script_plain repeats r15_script: the rerun table gives both verdicts per claim, and the study's cells (the
    answer, every cell) count R15 once."""
    path = tmp_path / 'runs.csv'
    write_runs(path, {**R15_ARMS, ('r15_script_plain', 'r15', 100, 'script', 0, 'baseline'): [8, 8, 9, 7, 8],
                      ('r15_script_plain', 'r15', 100, 'script', 2, 'primary'): [8, 7, 9, 8, 8]}, R15_METRICS)
    runs = summary.read_runs(path)
    assert [c['part'] for c in summary.study_cells(runs)] == ['r15_script']
    rows = [line for line in summary.rerun_table(runs).splitlines() if 'mode coverage' in line]
    assert len(rows) == 1 and rows[0].startswith('| r15_script | mode coverage | 2 | 5 / 5 | -4.2 [')
    assert '| no: fewer modes | +0 [' in rows[0] and rows[0].endswith('| no difference detected |')


def readme_copies(tmp_path):
    """Copies of README.md and study/README.md, laid out as in the repository."""
    paths = [tmp_path / 'README.md', tmp_path / 'study' / 'README.md']
    paths[1].parent.mkdir()
    for source, copy in zip(summary.READMES, paths):
        shutil.copy(source, copy)
    return paths


def block(text, name):
    """The content of the generated block NAME in text."""
    found = re.findall(re.escape(summary.OPENING.format(name)) + r'\n(.*?)\n' + re.escape(summary.CLOSING.format(name)),
                       text, re.S)
    assert len(found) == 1, name
    return found[0]


def outside_blocks(text):
    return re.sub(r'(<!-- generated: (\S+) .*?-->\n).*?(\n<!-- /generated: \2 -->)', r'\1\3', text, flags=re.S)


def test_the_readmes_generated_blocks_are_rebuilt_from_the_runs_and_a_second_rebuild_changes_nothing(tmp_path):
    """Every builder of GENERATED has a block in README.md or study/README.md; rebuilt from other runs, each block
    holds its builder's output and nothing outside the blocks changes; rebuilt again, no file changes (nor on the
    command line, which says so)."""
    path = tmp_path / 'runs.csv'
    write_runs(path, R15_ARMS, R15_METRICS)
    runs = summary.read_runs(path)
    readmes = readme_copies(tmp_path)
    before = [p.read_text() for p in readmes]
    first = summary.rebuild_readmes(runs, readmes)
    assert sorted(name for _, names, _ in first for name in names) == sorted(summary.GENERATED)
    assert 'coverage' in first[0][1] and {'cells', 'alone', 'stacked'} <= set(first[1][1])
    assert all(rewritten for *_, rewritten in first)  # these runs are not the study's
    after = [p.read_text() for p in readmes]
    for name, build in summary.GENERATED.items():
        assert block('\n'.join(after), name) == (build(runs) or '(not run yet)').strip('\n')
    assert '| R15, 100 points | script | 2 | 5 / 5 | 8 | -4.2 [' in block(after[0], 'coverage')
    assert [outside_blocks(t) for t in after] == [outside_blocks(t) for t in before]
    assert not any(rewritten for *_, rewritten in summary.rebuild_readmes(runs, readmes))
    assert [p.read_text() for p in readmes] == after
    assert os.listdir(readmes[1].parent) == ['README.md']  # no temporary file left

    shown = subprocess.run([sys.executable, SUMMARIZE, str(path), f'--results={tmp_path / "R.md"}', '--readmes',
                            *map(str, readmes)], capture_output=True, text=True, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert f'{readmes[0]}: blocks coverage unchanged' in shown.stdout
    assert [p.read_text() for p in readmes] == after


def test_the_committed_readmes_hold_what_the_study_csv_rebuilds(tmp_path):
    """README.md and study/README.md as committed are what `python study/summarize_runs.py` makes of
    study/runs.csv: rerun it after the CSV changes."""
    if not os.path.exists(summary.STUDY_CSV):
        pytest.skip('no study CSV in this checkout')
    readmes = readme_copies(tmp_path)
    changed = [p for p, _, rewritten in summary.rebuild_readmes(summary.read_runs(summary.STUDY_CSV), readmes)
               if rewritten]
    assert not changed, f'{changed}: run python study/summarize_runs.py'


def test_a_block_without_a_builder_or_a_builder_without_a_block_is_refused_in_one_line(tmp_path):
    """An unknown block name, a builder without a block, a block never closed and a stray closing marker are each
    refused in one line, and no file is rewritten, not even one whose blocks are fine; on the command line, exit
    status 1."""
    path = tmp_path / 'runs.csv'
    write_runs(path, R15_ARMS, R15_METRICS)
    runs = summary.read_runs(path)
    readmes = readme_copies(tmp_path)
    study = readmes[1].read_text()
    unknown = f'{summary.OPENING.format("nosuch")}\nold\n{summary.CLOSING.format("nosuch")}\n'
    refusals = [(study + unknown, summary.GENERATED, "block 'nosuch' has no builder"),
                (study, {**summary.GENERATED, 'extra': lambda runs: 'x'}, 'no block for the builder extra in '),
                (study + summary.OPENING.format('cells') + '\n', summary.GENERATED,
                 "block 'cells' is not closed by <!-- /generated: cells --> before the end"),
                (study + summary.CLOSING.format('cells') + '\n', summary.GENERATED, 'closes no block')]
    for text, generated, said in refusals:
        readmes[1].write_text(text)
        before = [p.read_text() for p in readmes]
        with pytest.raises(summary.BlockError, match=re.escape(said)) as refused:
            summary.rebuild_readmes(runs, readmes, generated)
        assert '\n' not in str(refused.value)
        assert [p.read_text() for p in readmes] == before

    readmes[1].write_text(study + unknown)
    shown = subprocess.run([sys.executable, SUMMARIZE, str(path), f'--results={tmp_path / "R.md"}', '--readmes',
                            *map(str, readmes)], capture_output=True, text=True, cwd=tmp_path)
    assert shown.returncode == 1 and shown.stderr.count('\n') == 1 and "block 'nosuch' has no builder" in shown.stderr
    assert readmes[1].read_text() == study + unknown


def test_the_control_compares_packed_with_unpacked_k0_and_gap_with_packs_only_among_packed_runs(tmp_path):
    """A packing part: K=0 unpacked, K=0 packed and K=2 packed. The control compares the two K=0 arms; GAP with
    packs compares K=2 with the packed K=0 alone (never with the unpacked one); the main tables leave the part
    out; a 'no difference detected' cell on the same data gets its half-width beside packing's effect."""
    path, rows = tmp_path / 'runs.csv', []

    def add(part, K, pack, values):
        for seed, v in enumerate(values):
            for g in (1, 2):
                rows.append({'part': part, 'condition': 'script', 'arm': 'primary' if K else 'baseline',
                             'dataset': 'r15', 'train_size': 100, 'K': K, 'seed': seed, 'lr': 1e-3, 'h_dim': 64,
                             'z_dim': 10, 'pack': pack, 'run': f'K{K}-pack{pack}-s{seed}', 'generator': g,
                             'iteration': 100, 'modes_captured': v, 'high_quality': 0.9, 'kl': 1 / v, 'd_gap': 0.1,
                             'pool_error': 0.3, 'd_real_error': 0.2, 'commit': 'abc1234'})
    add('r15_pack', 0, 1, [6, 7, 6, 7, 6])
    add('r15_pack', 0, 2, [9, 10, 9, 10, 9])
    add('r15_pack', 2, 2, [9, 10, 10, 9, 9])
    add('r15_script', 0, '', [8, 8, 8, 8, 8])  # a part from before the pack column: single samples
    add('r15_script', 2, '', [8, 8, 8, 8, 8.2])
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, sweep.COLUMNS, extrasaction='ignore')
        writer.writeheader()
        writer.writerows(rows)
    runs = summary.read_runs(path)
    control = summary.control_table(runs)
    modes = '| R15, 100 points | modes (2-D: captured; Stacked MNIST: distinct triples) | 5 / 5 | 6.4 | 9.4 | +3 ['
    assert modes in control
    assert control.count('yes: better with packs') == 2  # modes, and KL (lower)
    gap = '| R15, 100 points | D(x) gap, train - held-out | 5 / 5 | 0.1 | 0.1 | +0 [+0, +0] | no difference detected |'
    assert gap in control
    packed, = [c for c in summary.cells(runs) if c['part'] == 'r15_pack']
    assert {r['pack'] for r in packed['baseline'] + packed['treated']} == {2} and len(packed['baseline']) == 5
    packed_gap = summary.packed_gap_table(runs)
    assert packed_gap.startswith('| data | claim | K | with packs')
    assert '| R15, 100 points | mode coverage | 2 | 9.4 |' in packed_gap
    assert {c['part'] for c in summary.study_cells(runs)} == {'r15_script'}
    coverage, gam, gap_row = summary.detectable_table(runs).splitlines()[2:]
    assert coverage.startswith('| mode coverage | script | R15, 100 points | 2 | +0.04 [')
    assert '| 0.06 | +3 [' in coverage and coverage.endswith('| 50 |')
    assert gap_row.startswith('| generalisation | script |') and gap_row.endswith('| 0 | +0 [+0, +0] | - |')
