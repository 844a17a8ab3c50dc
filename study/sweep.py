"""The study's sweeps, part by part: runs what is missing (a finished run is skipped, an interrupted one resumed),
one thread per run, N at a time; then pools the part's runs with --compare and writes their rows into the
study's CSV (study/runs.csv), from which study/summarize_runs.py rebuilds the study's tables and figures.

    python study/sweep.py --list                # every part: its runs, how many are done, what it is
    python study/sweep.py r15_script            # run one part, two runs at a time
    python study/sweep.py r15_script r15_paper --jobs=1

Ctrl-C stops the runs at their next iteration with a checkpoint each; the same command continues them. Each run
writes out/study/PART/RUN/ (its log in log.txt there). The protocol (seeds, lengths, K) is the README's.
"""
import argparse
import csv
import glob
import os
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # study/ -> the repository
SCRIPT = os.path.join(ROOT, 'parallel_gan.py')
STUDY_CSV = os.path.join(ROOT, 'study', 'runs.csv')
SHARED_MNIST = os.path.join(ROOT, '..', 'shared', 'mnist')

# the settings of each kind of part, fixed before any run (the README's protocol)
FULL = dict(n_pairs=4, iterations=100_001, eval_every=10_000, log_every=5000, sample_every=5000)  # 53 epochs
SCARCE = dict(n_pairs=4, train_size=1000, iterations=20_001, eval_every=2500, log_every=2500, sample_every=2500)
TWO_D = dict(n_pairs=4, layers=3, h_dim=64, mb_size=100, lr=1e-3, beta1=0.5, iterations=20_001, eval_every=5000,
             log_every=5000, sample_every=5000)  # the 2-D mixtures under the script's conditions
TOY = dict(n_pairs=4, layers=4, h_dim=64, mb_size=50, lr=1e-3, beta1=0.5, iterations=10_001, eval_every=2500,
           log_every=2500, sample_every=2500)  # the paper's 4-layer toy networks
# Stacked MNIST (issue 39): a run of about 2 minutes on one thread, evaluated once at its end as published (26,000
# samples per generator); K=290: 10 swaps, each after 9,280 examples (an epoch is 128,000). h_dim and lr: tuned
# by K=0 alone on 2 seeds (stacked_tune; the choice and why: RESULTS.md, written before the K runs)
STACKED_RUN = dict(dataset='stacked_mnist', n_pairs=4, h_dim=128, lr=2e-4, mb_size=32, iterations=3_001, eval_every=0,
                   eval_at_end=True, eval_samples=26_000, log_every=500, sample_every=500)  # h_dim, lr: stacked_tune's
STACKED_GRID = [(128, 1e-3), (64, 1e-3), (128, 2e-4), (64, 2e-4)]  # (h_dim, lr) the tuning tries, the script's first
STACKED_K = 290
# Stacked MNIST at 5 epochs (fixed after stacked_script and stacked_paper, before any of its runs): a K=0 run to
# 20,000 iterations was the first to make confident samples (README); the script's conditions, K=2000 (10 swaps,
# as in the short parts), 10 seeds, h_dim and lr as chosen by stacked_tune; about 6 minutes a run on one thread, two at a time
STACKED_LONG_RUN = {**STACKED_RUN, 'iterations': 20_001, 'log_every': 2000, 'sample_every': 2000}
STACKED_LONG_K = 2000
CONDITIONS = {  # a condition's name (the CSV's condition column): the hyperparameters it sets
    'script': {'paper': False}, 'paper': {'paper': True},
    # each of the paper's six conditions alone, on top of the script's; and the paper's without batch norm
    'own_noise': {'own_noise': True}, 'prior_mixed': {'prior': 'mixed'}, 'input_noise': {'input_noise': 0.1},
    'clip': {'clip': 1.0}, 'swap_matching': {'swap': 'matching'}, 'batch_norm': {'batch_norm': True},
    'paper_without_batch_norm': {'paper': True, 'batch_norm': False},
    # the authors' code (hma02/GAN-evaluation) on top of the paper's: each of its two unstated choices, and both
    'paper_same_init': {'paper': True, 'same_init': True},
    'paper_swap_weights': {'paper': True, 'swap_moves': 'weights'},
    'paper_authors_code': {'paper': True, 'same_init': True, 'swap_moves': 'weights'},
}


def cell(settings, condition, Ks, seeds, **data):
    """A part's runs: K=0 and every K of Ks (the first is the verdict's; the rest secondary), for every seed.
    Returns [(run name, hyperparameters, arm, condition)], the baseline and the verdict's K first, seed by seed."""
    arms = {0: 'baseline', Ks[0]: 'primary', **{K: 'secondary' for K in Ks[1:]}}
    run = lambda K, s, arm: (f'K{K}-s{s}', {**settings, **data, **CONDITIONS[condition], 'K': K, 'seed': s}, arm,
                             condition)
    return ([run(K, s, arm) for s in seeds for K, arm in arms.items() if arm != 'secondary']
            + [run(K, s, arm) for K, arm in arms.items() if arm == 'secondary' for s in seeds])


def robustness():
    """R15 with 100 points, K=0 against a swap every epoch (K=2), both conditions, over lr x h_dim at z_dim 10 and
    at z_dim 2 with lr 2e-4, h_dim 128; 5 seeds each. lr 1e-3, h_dim 64, z_dim 10 is the study's own setting:
    its runs are the r15 parts' seeds 0 to 4, not run again."""
    grid = [(lr, h, 10) for lr in (2e-4, 1e-3) for h in (64, 128) if (lr, h) != (1e-3, 64)] + [(2e-4, 128, 2)]
    runs = []
    for condition in ('script', 'paper'):
        for lr, h, z in grid:
            for name, *rest in cell({**TOY, 'lr': lr, 'h_dim': h, 'z_dim': z}, condition, (2,), range(5),
                                    dataset='r15', train_size=100):
                runs.append((f'{condition}-lr{lr:g}-h{h}-z{z}-{name}', *rest))
    return runs


def stacked_tuning():
    """Stacked MNIST, K=0 alone under the script's conditions, seeds 0 and 1, at every (h_dim, lr) of STACKED_GRID."""
    return [(f'h{h}-lr{lr:g}-K0-s{s}', {**STACKED_RUN, **CONDITIONS['script'], 'h_dim': h, 'lr': lr, 'K': 0, 'seed': s},
             'baseline', 'script') for h, lr in STACKED_GRID for s in (0, 1)]


# The positive control (PacGAN, Lin et al. 2018), fixed before any of its runs: can this setup detect a remedy for
# mode collapse that is known to work? K=0 with D judging single samples against K=0 with PacGAN2 (packs of two),
# and, where K is given, GAP with packs (K>0 against K=0, both packed), under the script's conditions, 10 seeds,
# each data set at its own part's settings. PacGAN's D sees a batch of B packs, each of `pack` samples, so the
# packed arm takes mb_size = PACK * B (the unpacked arm's B) and the same number of iterations, as PacGAN's runs do.
PACK = 2


def packing(settings, K, seeds, unpacked=True, **data):
    """The control and GAP with packs, seed by seed: K=0 unpacked (K0-s{seed}, the data set's own part's K=0 runs
    again), K=0 packed (K0-pack2-s{seed}) and, where K, packed GAP (K{K}-pack2-s{seed})."""
    packed = {**settings, 'pack': PACK, 'mb_size': PACK * settings['mb_size']}
    arms = [('K0-s', settings, 0, 'baseline')] * unpacked + [(f'K0-pack{PACK}-s', packed, 0, 'baseline')]
    arms += [(f'K{K}-pack{PACK}-s', packed, K, 'primary')] if K else []
    return [(f'{name}{s}', {**hp, **data, **CONDITIONS['script'], 'K': k, 'seed': s}, arm, 'script')
            for s in seeds for name, hp, k, arm in arms]


TEN, FIVE = range(10), range(5)
INTERRUPTED = []  # set by Ctrl-C: start no more runs
R15, GRID_2500 = dict(dataset='r15', train_size=100), dict(dataset='grid25', train_size=2500)
PARTS = {  # name: (what it is, its runs, whether its runs share one pool of discriminators in --compare)
    'r15_script': ("R15, 100 points, the script's conditions", cell(TOY, 'script', (2, 1), TEN, **R15), True),
    'r15_paper': ("R15, 100 points, the paper's conditions", cell(TOY, 'paper', (2, 1), TEN, **R15), True),
    'grid25x2500_script': ("grid25, 2,500 points, the script's conditions",
                           cell(TWO_D, 'script', (25,), TEN, **GRID_2500), True),
    'grid25x2500_paper': ("grid25, 2,500 points, the paper's conditions",
                          cell(TOY, 'paper', (50, 25), TEN, **GRID_2500), True),
    'grid25_script': ("grid25, 60,000 points, the script's conditions",
                      cell(TWO_D, 'script', (600,), TEN, dataset='grid25'), True),
    'ring8_script': ("ring8, 60,000 points, the script's conditions",
                     cell(TWO_D, 'script', (600,), TEN, dataset='ring8'), True),
    'robust_r15': ('R15 robustness: lr x h_dim x z_dim, both conditions', robustness(), False),
    'mnist1000_script': ("MNIST, 1,000 images, the script's conditions",
                         cell(SCARCE, 'script', (16, 100), TEN, dataset='mnist'), True),
    'mnist1000_paper': ("MNIST, 1,000 images, the paper's conditions",
                        cell(SCARCE, 'paper', (16,), TEN, dataset='mnist'), True),
    'mnist_script': ("MNIST, 60,000 images, the script's conditions",
                     cell(FULL, 'script', (937, 100), FIVE, dataset='mnist'), True),
    'mnist_paper': ("MNIST, 60,000 images, the paper's conditions", cell(FULL, 'paper', (937,), FIVE, dataset='mnist'), True),
    # which of the paper's conditions turns the verdicts: each alone on R15 (swap_matching's K=0 runs repeat
    # r15_script's: without swaps the swap rule does nothing), the paper's without batch norm, batch norm alone on
    # 1,000 MNIST images, and the robustness check's bimodal cell with 20 seeds
    **{f'r15_{c}': (f"R15, 100 points, the script's conditions plus {c} alone", cell(TOY, c, (2,), TEN, **R15), True)
       for c in ('own_noise', 'prior_mixed', 'input_noise', 'clip', 'swap_matching', 'batch_norm')},
    'r15_paper_without_batch_norm': ("R15, 100 points, the paper's conditions without batch norm",
                                     cell(TOY, 'paper_without_batch_norm', (2,), TEN, **R15), True),
    'mnist1000_batch_norm': ("MNIST, 1,000 images, the script's conditions plus batch norm alone",
                             cell(SCARCE, 'batch_norm', (16,), TEN, dataset='mnist'), True),
    # r15_script and r15_paper again, run by the plain-PyTorch code (the same maths; no longer bit for bit)
    'r15_script_plain': ("R15, 100 points, the script's conditions (plain code)", cell(TOY, 'script', (2, 1), TEN, **R15),
                         True),
    'r15_paper_plain': ("R15, 100 points, the paper's conditions (plain code)", cell(TOY, 'paper', (2, 1), TEN, **R15),
                        True),
    'r15_paper_lr2e-4_z2': ("R15, 100 points, the paper's conditions at lr 2e-4, h_dim 128, z_dim 2, 20 seeds",
                            cell({**TOY, 'lr': 2e-4, 'h_dim': 128, 'z_dim': 2}, 'paper', (2,), range(20), **R15), True),
    # the authors' code: r15_paper with each of its two unstated choices, and with both; every part its own K=0 arm
    # (swap_moves cannot change a run without swaps: its K=0 arm repeats the paper's, run again to be safe)
    'r15_paper_same_init': ("R15, 100 points, the paper's conditions plus same_init (the authors' code)",
                            cell(TOY, 'paper_same_init', (2,), TEN, **R15), True),
    'r15_paper_swap_weights': ("R15, 100 points, the paper's conditions plus swap_moves='weights' (the authors' code)",
                               cell(TOY, 'paper_swap_weights', (2,), TEN, **R15), True),
    'r15_paper_authors_code': ("R15, 100 points, the paper's conditions plus both: the authors' code",
                               cell(TOY, 'paper_authors_code', (2,), TEN, **R15), True),
    # Stacked MNIST (issue 39): the tuning of K=0 alone, then both conditions, K=0 against K=290, 10 seeds
    'stacked_tune': ('Stacked MNIST, K=0 alone: h_dim and lr, 2 seeds', stacked_tuning(), False),
    'stacked_script': ("Stacked MNIST, 128,000 examples, the script's conditions",
                       cell(STACKED_RUN, 'script', (STACKED_K,), TEN), True),
    'stacked_paper': ("Stacked MNIST, 128,000 examples, the paper's conditions",
                      cell(STACKED_RUN, 'paper', (STACKED_K,), TEN), True),
    'stacked_script_long': ("Stacked MNIST, 128,000 examples, the script's conditions, 20,001 iterations (5 epochs)",
                            cell(STACKED_LONG_RUN, 'script', (STACKED_LONG_K,), TEN), True),
    # the positive control, PacGAN2 against K=0 (and GAP with packs where a K is given), the script's conditions
    'r15_pack': ("R15, 100 points: K=0 unpacked and packed (PacGAN2, the control), GAP with packs (K=2)",
                 packing(TOY, 2, TEN, **R15), True),
    'grid25_pack': ("grid25, 60,000 points: K=0 unpacked and packed (the control), GAP with packs (K=600)",
                    packing(TWO_D, 600, TEN, dataset='grid25'), True),
    'ring8_pack': ("ring8, 60,000 points: K=0 unpacked and packed (PacGAN2, the control)",
                   packing(TWO_D, None, TEN, dataset='ring8'), True),
    'stacked_pack': ("Stacked MNIST at 20,001 iterations: K=0 packed (PacGAN2; its unpacked arm: stacked_script_long's "
                     "K=0 runs)", packing(STACKED_LONG_RUN, None, TEN, unpacked=False), True),
}
# the control's unpacked arm where a packing part does not run it again: another part's K=0 runs (summarize_runs.py)
UNPACKED_ELSEWHERE = {'stacked_pack': 'stacked_script_long'}
# a part whose K=0 runs are another part's: the same runs bit for bit, as they differ only in swap_moves, which acts
# at a swap alone; copied (with their checkpoints) rather than run again, so that the part's pool holds both arms
SAME_K0_RUNS = {'r15_paper_same_init': 'r15_paper_authors_code'}
# the pool's samples per generator where 26,000 would take hours on one thread (80 generators x 80 discriminators
# of 2,352 inputs); else --compare's default
COMPARE_SAMPLES = dict.fromkeys(('stacked_script', 'stacked_paper', 'stacked_script_long', 'stacked_pack'), 1000)
CONFIG_COLUMNS = ('dataset', 'train_size', 'paper', 'K', 'seed', 'n_pairs', 'layers', 'h_dim', 'z_dim', 'lr', 'beta1',
                  'mb_size', 'iterations', 'pack')
METRIC_COLUMNS = ('modes', 'modes_captured', 'kl', 'score', 'confidence', 'fd', 'high_quality', 'pool_mean', 'pool_worst',
                  'd_train', 'd_heldout', 'd_gap', 'd_train_acc', 'd_heldout_acc', 'd_acc_gap')
POOL_COLUMNS = ('pool_error', 'pool_error_others', 'd_fake_error', 'd_real_error', 'best_by_pool')
COLUMNS = ('part', 'condition', 'arm', *CONFIG_COLUMNS, 'run', 'generator', 'iteration', *METRIC_COLUMNS, *POOL_COLUMNS,
           'commit')


def defaults():
    """parallel_gan.py's hyperparameter block: name -> default."""
    sys.path.insert(0, ROOT)
    import parallel_gan
    return {name: default for name, default, _ in parallel_gan.read_block()}


def checkpoint_iteration(folder):
    """The iteration a run's checkpoint stopped after, or None without one."""
    import torch
    path = os.path.join(folder, 'checkpoint.pt')
    if not os.path.exists(path):
        return None
    return torch.load(path, map_location='cpu', weights_only=True)['iteration']


def command(hp, folder, args, resume):
    flags = [f'--{k}={v}' for k, v in hp.items()]
    data_root = [f'--data_root={args.data_root}'] if hp['dataset'] in ('mnist', 'stacked_mnist') else []
    return [sys.executable, SCRIPT, *flags, *data_root, '--threads=1', f'--out_dir={folder}',
            f'--classifier_dir={args.classifier_dir}', *(['--resume=True'] if resume else [])]


def copy_same_run(part, name, hp, folder, args):
    """A K=0 run of a part in SAME_K0_RUNS: copied from its twin part where the twin's run is done and it is not."""
    source = os.path.join(args.study, SAME_K0_RUNS.get(part, ''), name)
    done = hp['iterations'] - 1
    if part in SAME_K0_RUNS and hp['K'] == 0 and checkpoint_iteration(folder) is None \
            and checkpoint_iteration(source) == done:
        shutil.copytree(source, folder, dirs_exist_ok=True)
        print(f'{part}: {name} copied from {SAME_K0_RUNS[part]} (the same run)', flush=True)


def minutes(seconds):
    return f'{seconds / 60:.0f} min' if seconds >= 90 else f'{seconds:.0f} s'


def run_part(part, args):
    """Run what is missing of a part, args.jobs at a time. Returns the names of the runs that failed."""
    _, runs, _ = PARTS[part]
    todo = []
    for name, hp, *_ in runs:
        folder = os.path.join(args.study, part, name)
        copy_same_run(part, name, hp, folder, args)
        at = checkpoint_iteration(folder)
        if at != hp['iterations'] - 1:
            todo.append((name, command(hp, folder, args, resume=at is not None), folder))
    print(f'{part}: {len(runs) - len(todo)} of {len(runs)} runs done, {len(todo)} to run, {args.jobs} at a time', flush=True)
    going, failed, took, start = {}, [], [], time.time()
    while (todo and not INTERRUPTED) or going:
        while todo and len(going) < args.jobs and not INTERRUPTED:
            name, cmd, folder = todo.pop(0)
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, 'log.txt'), 'a') as log:
                going[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), time.time())
        time.sleep(0.5)
        for name, (proc, began) in list(going.items()):
            if proc.poll() is None:
                continue
            del going[name]
            took.append(time.time() - began)
            if proc.returncode:
                failed.append(name)
            left = sum(took) / len(took) * (len(todo) + len(going)) / args.jobs
            status = ('done' if not proc.returncode else 'stopped by Ctrl-C, its checkpoint saved' if INTERRUPTED
                      else f'FAILED (exit status {proc.returncode}; see its log.txt)')
            print(f'  [{len(took)}/{len(took) + len(todo) + len(going)}] {name} {status} in {minutes(took[-1])}; '
                  f'about {minutes(left)} left ({minutes(time.time() - start)} so far)', flush=True)
    return failed + [name for name, _, _ in todo]


def compare_part(part, args):
    """--compare over the part's runs, unless its compare_generators.csv is newer than every checkpoint."""
    folder = os.path.join(args.study, part)
    written = os.path.join(folder, 'compare_generators.csv')
    newest = max(os.path.getmtime(p) for p in glob.glob(os.path.join(folder, '*', 'checkpoint.pt')))
    if os.path.exists(written) and os.path.getmtime(written) > newest:
        return
    start = time.time()
    subprocess.run([sys.executable, SCRIPT, f'--compare={folder}', f'--data_root={args.data_root}',
                    f'--classifier_dir={args.classifier_dir}', f'--threads={args.jobs}',
                    *([f'--eval_samples={COMPARE_SAMPLES[part]}'] if part in COMPARE_SAMPLES else [])],
                   cwd=ROOT, check=True, stdout=open(os.path.join(folder, 'compare.log'), 'w'), stderr=subprocess.STDOUT)
    print(f'{part}: pooled with --compare in {minutes(time.time() - start)}', flush=True)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def part_rows(part, args):
    """The CSV's rows of a part: one per run and generator, its last evaluation and its pool numbers."""
    _, runs, pooled = PARTS[part]
    folder = os.path.join(args.study, part)
    pool = {(r['run'], r['generator']): r for r in read_csv(os.path.join(folder, 'compare_generators.csv'))} if pooled else {}
    best = {r['run'] for r in read_csv(os.path.join(folder, 'compare_best.csv'))} if pooled else set()
    rows, commit = [], code_commit()
    for name, hp, arm, condition in runs:
        metrics = read_csv(os.path.join(folder, name, 'metrics.csv'))
        last = max(int(r['iteration']) for r in metrics)
        for r in (r for r in metrics if int(r['iteration']) == last):
            g = r['generator']
            mine = pool.get((name, g), {})
            rows.append({'part': part, 'condition': condition, 'arm': arm,
                         **{k: hp.get(k, defaults()[k]) for k in CONFIG_COLUMNS}, 'run': name, 'generator': g,
                         'iteration': last, **{k: r[k] for k in METRIC_COLUMNS},
                         **{k: mine.get(k, '') for k in POOL_COLUMNS[:-1]},
                         'best_by_pool': int(f'{name}:G{g}' in best) if pooled else '', 'commit': commit})
    return rows


def code_commit():
    """The commit of the code that ran the part (with '+' where parallel_gan.py differs from it), or ''."""
    git = lambda *a: subprocess.run(['git', *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    commit = git('rev-parse', '--short', 'HEAD')
    return commit + ('+' if commit and git('status', '--porcelain', SCRIPT) else '')


def publish(part, args):
    """Replace the part's rows in the study's CSV with those of its runs now."""
    kept = [r for r in read_csv(args.csv) if r['part'] != part] if os.path.exists(args.csv) else []
    rows = kept + part_rows(part, args)
    order = list(PARTS)
    rows.sort(key=lambda r: order.index(r['part']) if r['part'] in order else len(order))
    tmp = args.csv + '.tmp'
    with open(tmp, 'w', newline='') as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, args.csv)
    print(f'{part}: its {sum(r["part"] == part for r in rows)} rows written to {os.path.relpath(args.csv, ROOT)}', flush=True)


def show_parts(args):
    width = max(map(len, PARTS))
    for part, (what, runs, _) in PARTS.items():
        done = sum(checkpoint_iteration(os.path.join(args.study, part, name)) == hp['iterations'] - 1
                   for name, hp, *_ in runs)
        print(f'{part:{width}} {done:3}/{len(runs):<3} runs done   {what}')


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('parts', nargs='*', help=f'any of: {", ".join(PARTS)}')
    parser.add_argument('--list', action='store_true', help='show the parts and what is done')
    parser.add_argument('--jobs', type=int, default=2, help='runs at a time, one thread each (default 2)')
    parser.add_argument('--study', default=os.path.join(ROOT, 'out', 'study'), help='where the runs go')
    parser.add_argument('--data_root', default=SHARED_MNIST if os.path.isdir(SHARED_MNIST) else 'out/data')
    parser.add_argument('--classifier_dir', default=os.path.join(ROOT, 'out', 'study', 'classifiers'))
    parser.add_argument('--csv', default=STUDY_CSV, help='the study\'s CSV, a row per run and generator')
    args = parser.parse_args()
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown or args.jobs < 1 or not (args.parts or args.list):
        parser.error(f'unknown part {", ".join(unknown)}; the parts: {", ".join(PARTS)}' if unknown else
                     '--jobs must be at least 1' if args.jobs < 1 else 'name a part, or --list')
    if args.list:
        show_parts(args)
    signal.signal(signal.SIGINT, lambda *_: INTERRUPTED.append(1))  # the runs get it too: they checkpoint and stop
    failed = []
    for part in args.parts:
        failed += [f'{part}/{name}' for name in run_part(part, args)]
        if failed:
            break
        if PARTS[part][2]:
            compare_part(part, args)
        publish(part, args)
    if failed:
        sys.exit(f'sweep.py: {len(failed)} run(s) stopped before their end: {", ".join(failed)}; '
                 f'the same command continues them')
