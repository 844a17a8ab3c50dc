"""Speed of parallel_gan.py's training iteration against the plain reference loop.

    python study/benchmark.py                  # n_pairs 2, 4, 8 on the default device
    python study/benchmark.py --pairs=2 --rounds=3 --device=cpu --threads=1
    python study/benchmark.py --against=classic --pairs=2,4     # the classic script's iteration, op for op
    python study/benchmark.py --against=HEAD~1 --pairs=2,4      # this version's iteration against an older one's
    python study/benchmark.py --against=paper --pairs=2          # what --paper=True costs
    python study/benchmark.py --against=hinge --pairs=2          # an edit: hinge loss and LeakyReLU in D

Each loop runs in a child process of its own, with denormals flushed or not as its script runs: a command-line run
of parallel_gan.py flushes denormals in every thread (train() sets it before torch starts its worker threads, which
take the setting from the thread that starts them), the reference and classic loops (as the classic script) in
none; one process could not hold both. Each child first trains `--warmup` iterations (default 2,000), so that both
are timed in the state a run spends its time in, not from fresh weights: on MNIST, Adam's moments of the
always-empty border pixels and the gradients through saturated sigmoids become denormal floats within the first
1,000 iterations, which the CPU handles many times slower. Then alternating timed rounds, one child at a time; each
times `--iterations` iterations (noise, batch and both updates). Printed: the median iterations per second of each,
their ratio, the peak memory of 300 iterations of each at 2 pairs beside that of the data alone (also in child
processes), and the processes row (--process_rounds): 2 pairs as 1 process x 2 threads against torchrun's 2
processes x 1 thread.
To time an edit of yours against the code it started from: --against=HEAD.
Not collected by pytest: it is a measurement, not a test.
"""
import argparse
import multiprocessing
import os
import re
import tempfile
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)  # the repository: parallel_gan.py
TESTS = os.path.join(ROOT, 'tests')  # reference.py, the plain loop
sys.path[:0] = [ROOT, TESTS]
import parallel_gan as pg  # noqa: E402
from reference import ReferenceGAP  # noqa: E402

SHARED_MNIST = os.environ.get('GAP_MNIST') or os.path.join(ROOT, '..', 'shared', 'mnist')


def training_images(dev):
    """Real MNIST when it is at hand, else 60,000 random images of the same size."""
    if os.path.isdir(os.path.join(SHARED_MNIST, 'MNIST', 'raw')):
        return pg.load_images('mnist', SHARED_MNIST)[0].to(dev), 'MNIST'
    return torch.randint(0, 256, (60000, 784), dtype=torch.uint8, device=dev), 'random images'


def reference_loop(n_pairs, images, dev):
    """The reference: its own nets, the classic op sequence pair after pair, one step per call."""
    cfg = pg.parse_args([f'--n_pairs={n_pairs}'])
    ref = ReferenceGAP(n_pairs, cfg['z_dim'], cfg['h_dim'], images.shape[1], cfg['lr']).to(dev)
    batches = pg.Batches(images, torch.zeros(len(images), dtype=torch.long, device=dev), cfg['mb_size'], 1,
                         torch.float32)
    noise = torch.Generator(device=dev).manual_seed(2)
    state = {'it': 0}

    def step():
        it = state['it'] = state['it'] + 1
        z = torch.randn(cfg['mb_size'], cfg['z_dim'], generator=noise, device=dev)
        ref.iteration(z, batches.next()[0][0])
        if pg.swaps_at(it, cfg):
            ref.swap(pg.new_partners(cfg, it).tolist())
    return step


def classic_loop(n_pairs, images, dev):
    """The classic script's iteration, op for op: one noise batch and one minibatch for every pair; per pair, D's
    loss on a G sample that is not detached (its backward runs through G too), D's step, then a second G sample for
    G's step; losses -mean(log(D + 1e-8) ...) on D's sigmoid output; torch's default Adam; every network's gradients
    zeroed after every step; the pairs swap their discriminators every K iterations."""
    cfg = pg.parse_args([f'--n_pairs={n_pairs}'])
    h, z_dim, x_dim = cfg['h_dim'], cfg['z_dim'], images.shape[1]
    mlp = lambda n_in, n_out: nn.Sequential(nn.Linear(n_in, h), nn.ReLU(), nn.Linear(h, n_out), nn.Sigmoid()).to(dev)
    Gs, Ds = [mlp(z_dim, x_dim) for _ in range(n_pairs)], [mlp(x_dim, 1) for _ in range(n_pairs)]
    solvers = {net: torch.optim.Adam(net.parameters(), lr=cfg['lr']) for net in Gs + Ds}
    log = lambda t: torch.log(t + 1e-8)
    batches = pg.Batches(images, torch.zeros(len(images), dtype=torch.long, device=dev), cfg['mb_size'], 1,
                         torch.float32)
    noise, state = torch.Generator(device=dev).manual_seed(2), {'it': 0, 'Ds': Ds}

    def reset_grad():
        for net in Gs + Ds:
            net.zero_grad()

    def step():
        it = state['it'] = state['it'] + 1
        z = torch.randn(cfg['mb_size'], z_dim, generator=noise, device=dev)
        x = batches.next()[0][0]
        for G, D in zip(Gs, state['Ds']):
            D_loss = -torch.mean(log(D(x)) + log(1 - D(G(z))))
            D_loss.backward()
            solvers[D].step()
            reset_grad()
            G_loss = -torch.mean(log(D(G(z))))
            G_loss.backward()
            solvers[G].step()
            reset_grad()
        if pg.swaps_at(it, cfg):
            state['Ds'] = [state['Ds'][j] for j in pg.new_partners(cfg, it).tolist()]
    return step


def parallel_gan_loop(n_pairs, images, dev, module=pg, options=()):
    """parallel_gan.py's iteration (or another version's: module), as its training loop runs it."""
    cfg = module.parse_args([f'--n_pairs={n_pairs}', *options])
    noise, state = torch.Generator(device=dev).manual_seed(2), {'it': 0}
    if not hasattr(module, 'Side'):  # a version before the plain redesign: its own API, its written-out backward
        module.check_losses()
        module.check_backward(cfg, images.shape[1], say=lambda message: None)
        G, D = module.make_pairs(cfg, images.shape[1], dev, torch.float32)
        batches = module.make_batches(images, cfg, 1)
        advance = lambda it: module.gap_iteration(it, G, D, batches, noise, cfg)[0]
    else:
        pairs = module.make_pairs(cfg, images.shape[1], dev, torch.float32)
        batches = module.make_batches(images, torch.zeros(len(images), dtype=torch.long, device=dev), cfg, 1,
                                      torch.float32)
        advance = lambda it: module.gap_iteration(it, pairs, batches, noise, cfg)
    recent = []  # as the recorder keeps them

    def step():
        it = state['it'] = state['it'] + 1
        stats = advance(it)
        recent.append(torch.stack(list(stats.values()), 1) if isinstance(stats, dict) else stats)
        if len(recent) == 1000:
            recent.clear()
    return step


def version(revision):
    """parallel_gan.py as it was at a git revision, imported as a module of its own."""
    from conftest import script_module
    source = subprocess.run(['git', 'show', f'{revision}:parallel_gan.py'], capture_output=True, text=True, check=True,
                            cwd=ROOT).stdout
    return script_module(source, tempfile.mkdtemp(), f'parallel_gan_at_{revision}')[0]


HINGE = (  # the README's recipe: hinge losses, and LeakyReLU(0.2) in the discriminators
    ('return F.softplus(-real_logit).mean((1, 2)) + F.softplus(fake_logit).mean((1, 2))',
     'return F.relu(1 - real_logit).mean((1, 2)) + F.relu(1 + fake_logit).mean((1, 2))'),
    ('return F.softplus(-fake_logit).mean((1, 2))', 'return -fake_logit.mean((1, 2))'),
    ("""            layers.append(BatchNorm(n, h))
        layers.append(nn.ReLU(inplace=True))
    return Networks(*layers, Linear(n, h, 1))""", """            layers.append(BatchNorm(n, h))
        layers.append(nn.LeakyReLU(0.2, inplace=True))
    return Networks(*layers, Linear(n, h, 1))"""))


def edited(edits):
    """This parallel_gan.py with (old, new) text edits, imported as a module of its own."""
    from conftest import edited_copy
    return edited_copy(tempfile.mkdtemp(), *edits)[0]


def flushes(module):
    """Whether a version of parallel_gan.py trains with denormals flushed (on the CPU, as its train() sets it)."""
    return hasattr(module, 'denormals_flushed')


def denormals_kept():
    """How many of 2**20 denormal floats torch's threads keep when doubling them: 0 when every thread flushes."""
    tiny = torch.ones(1 << 20, dtype=torch.int32).view(torch.float32)  # each 1.4e-45, a float32 denormal
    return int((tiny * 2).count_nonzero())


def rate(step, iterations, dev):
    """Iterations per second of at least `iterations` iterations (a step may do several)."""
    sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
    sync()
    start, done = time.perf_counter(), 0
    while done < iterations:
        done += step() or 1
    sync()
    return done / (time.perf_counter() - start)


def serve(conn, which, n_pairs, options, device, threads):
    """A child process's loop: 'reference', 'classic', 'this' (this parallel_gan.py), 'hinge' (it, edited) or a git
    revision's parallel_gan.py. Set up with denormals flushed or not as its script runs, then one timed round per
    request (0: done)."""
    dev = pg.pick_device(device)
    module = None  # the reference and classic loops: written in this file
    if which not in ('reference', 'classic'):
        module = pg if which == 'this' else edited(HINGE) if which == 'hinge' else version(which)
    if dev.type == 'cpu':  # before torch's first parallel work, so that its worker threads take it too
        torch.set_flush_denormal(module is not None and flushes(module))
    if threads:
        torch.set_num_threads(threads)
    images, _ = training_images(dev)
    step = (reference_loop(n_pairs, images, dev) if which == 'reference' else classic_loop(n_pairs, images, dev)
            if which == 'classic' else parallel_gan_loop(n_pairs, images, dev, module, options))
    conn.send(dev.type == 'cpu' and denormals_kept() == 0)  # set up; whether every thread flushes
    while iterations := conn.recv():
        conn.send(rate(step, iterations, dev))


class Loop:
    """A loop (serve's `which`) in a child process of its own, started fresh: torch's worker threads keep the
    denormal setting they started with, so the two loops' arithmetic could not differ within one process."""

    def __init__(self, which, n_pairs, options, args):
        context = multiprocessing.get_context('spawn')
        self.conn, theirs = context.Pipe()
        self.child = context.Process(target=serve, args=(theirs, which, n_pairs, options, args.device, args.threads),
                                     daemon=True)
        self.child.start()
        theirs.close()  # the child's end: a child that dies ends the pipe, and answer() says so
        self.which = which
        self.flushes = self.answer()

    def answer(self):
        try:
            return self.conn.recv()
        except EOFError:
            self.child.join()
            sys.exit(f'benchmark.py: the {self.which} loop\'s process died (exit status {self.child.exitcode}); '
                     'its error is above')

    def rate(self, iterations):
        self.conn.send(iterations)
        return self.answer()

    def close(self):
        self.conn.send(0)
        self.child.join()


def peak_memory(which, dev):
    """(peak once the data are loaded, peak after 300 iterations) of a child process that trains one loop on
    full-size data, in MiB."""
    child = subprocess.run([sys.executable, __file__, f'--memory_child={which}', f'--device={dev}'],
                           capture_output=True, text=True)
    if child.returncode != 0:
        return float('nan'), float('nan')
    data, trained = child.stdout.split()[-2:]
    return float(data), float(trained)


def peak(dev):
    """This process's peak memory so far, in MiB: GPU memory allocated, or resident memory."""
    if dev.type == 'cuda':
        return torch.cuda.max_memory_allocated() / 2**20
    with open('/proc/self/status') as f:  # VmHWM: this process's peak (ru_maxrss would include the parent's)
        return next(int(line.split()[1]) for line in f if line.startswith('VmHWM')) / 1024


def memory_child(which, dev):
    images, _ = training_images(dev)
    data = peak(dev)
    step = (reference_loop if which == 'reference' else parallel_gan_loop)(2, images, dev)
    for _ in range(300):
        step()
    print(data, peak(dev))


def script_rate(launcher, threads, data_root, out_dir, iterations=4001):
    """it/s that parallel_gan.py itself logs, averaged over its log windows after the first (no start-up)."""
    command = [*launcher, os.path.join(ROOT, 'parallel_gan.py'), f'--data_root={data_root}',
               f'--out_dir={out_dir}', f'--iterations={iterations}', '--log_every=1000', '--sample_every=1000000',
               '--eval_every=0', f'--threads={threads}', '--device=cpu']
    log = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rates = [float(r) for r in re.findall(r'\| (\d+) it/s', log)][1:]
    return statistics.mean(rates)


def processes_row(rounds):
    """2 processes x 1 thread (torchrun, one pair each) against 1 process x 2 threads, n_pairs=2, on the CPU."""
    with tempfile.TemporaryDirectory() as scratch:
        data_root = SHARED_MNIST
        if not os.path.isdir(os.path.join(SHARED_MNIST, 'MNIST', 'raw')):
            from conftest import make_mnist
            data_root = make_mnist(os.path.join(scratch, 'data'), train=6000, test=100)
        torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
        rates = {'one': [], 'two': []}
        for _ in range(rounds):
            rates['one'].append(script_rate([sys.executable], 2, data_root, os.path.join(scratch, 'one')))
            rates['two'].append(script_rate(torchrun, 1, data_root, os.path.join(scratch, 'two')))
    one, two = statistics.median(rates['one']), statistics.median(rates['two'])
    print(f'n_pairs 2 on the CPU, the script\'s own logged it/s: 1 process x 2 threads {one:.0f} it/s, '
          f'2 processes x 1 thread (torchrun, gloo) {two:.0f} it/s ({two / one:.2f}x)')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--pairs', default='2,4,8', help='comma-separated n_pairs values')
    parser.add_argument('--iterations', type=int, default=0, help='iterations per timed round (0: about 1 s)')
    parser.add_argument('--rounds', type=int, default=7, help='alternating timed rounds per loop')
    parser.add_argument('--warmup', type=int, default=2000, help='iterations each loop trains before it is timed '
                        '(the steady state of a run; 0: time fresh weights)')
    parser.add_argument('--device', default='auto')
    parser.add_argument('--threads', type=int, default=0, help='torch threads (0: default)')
    parser.add_argument('--process_rounds', type=int, default=2, help='rounds of the processes row: 2 pairs on the CPU '
                        'as 1 process x 2 threads against torchrun\'s 2 processes x 1 thread, whole 4,001-iteration '
                        'runs of the script (0: skip it)')
    parser.add_argument('--against', default='', help='instead of the reference loop, time against: "classic" (the '
                        'classic script\'s iteration, op for op), a git revision (its parallel_gan.py), "paper" (this '
                        'one with --paper=True) or "hinge" (this one edited: hinge losses, LeakyReLU in D)')
    parser.add_argument('--options', default='', help='hyperparameters of both loops, e.g. --options=--K=0')
    parser.add_argument('--memory_child', default='', help=argparse.SUPPRESS)
    args = parser.parse_args()
    dev = pg.pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args.memory_child, dev)

    source = 'MNIST' if os.path.isdir(os.path.join(SHARED_MNIST, 'MNIST', 'raw')) else 'random images'
    name = torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f'CPU ({os.cpu_count()} cores)'
    print(f'device {dev} [{name}], {args.threads or torch.get_num_threads()} threads, torch {torch.__version__}, '
          f'data: {source}, batch 32, each loop in its own process, timed after {args.warmup} iterations of '
          f'training, {args.rounds} alternating round{"s" * (args.rounds != 1)}, median')
    options = args.options.split() if args.options else []
    against = {'': 'the reference loop (the classic op sequence slimmed, pair after pair)',
               'classic': 'the classic script\'s iteration, op for op', 'paper': 'parallel_gan.py with --paper=True',
               'hinge': 'parallel_gan.py edited: hinge losses, LeakyReLU in D'}
    baseline_name = against.get(args.against, f'parallel_gan.py at {args.against}')
    print(f'(the baseline: {baseline_name}; options {options or "none"})')
    baseline = {'': ('reference', options), 'paper': ('this', [*options, '--paper=True']),
                'hinge': ('hinge', options), 'classic': ('classic', options)}.get(args.against, (args.against, options))
    for n_pairs in [int(p) for p in args.pairs.split(',')]:
        loops = {'baseline': Loop(baseline[0], n_pairs, baseline[1], args),
                 'parallel_gan': Loop('this', n_pairs, options, args)}
        if dev.type == 'cpu' and n_pairs == int(args.pairs.split(',')[0]):
            print('denormals flushed in every thread: ' + ', '.join(f'{name} {"yes" if loop.flushes else "no"}'
                                                                  for name, loop in loops.items()))
            print(f'{"n_pairs":>7} {"baseline it/s":>15} {"parallel_gan it/s":>18} {"ratio":>9}')
        iterations = args.iterations or max(20, int(400 / n_pairs))
        for loop in loops.values():  # one at a time: into the steady state (and past the first calls' set-up)
            loop.rate(max(args.warmup, 20))
        rates = {name: [] for name in loops}
        for _ in range(args.rounds):
            for name, loop in loops.items():
                rates[name].append(loop.rate(iterations))
        for loop in loops.values():
            loop.close()
        base, ours = statistics.median(rates['baseline']), statistics.median(rates['parallel_gan'])
        ratios = sorted(o / r for r, o in zip(rates['baseline'], rates['parallel_gan']))
        print(f'{n_pairs:>7} {base:>15.1f} {ours:>18.1f} {ours / base:>8.2f}x   (per round {ratios[0]:.2f}x..'
              f'{ratios[-1]:.2f}x)', flush=True)
    if args.against:
        return
    (ref_data, ref_mem), (our_data, our_mem) = peak_memory('reference', dev), peak_memory('parallel_gan', dev)
    kind = 'GPU memory allocated' if dev.type == 'cuda' else 'resident memory'
    print(f'peak {kind}, 2 pairs, 300 iterations on full-size data: reference {ref_mem:.0f} MiB, parallel_gan '
          f'{our_mem:.0f} MiB (the data loaded, before either loop: {ref_data:.0f} and {our_data:.0f} MiB)')
    if args.process_rounds:
        processes_row(args.process_rounds)


if __name__ == '__main__':
    main()
