"""The GPU path (skipped without a CUDA device): no host-device waits inside the loop, and whole runs."""
import os

import pytest
import torch

import parallel_gan as pg
from conftest import load, run_script

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')


def test_an_iteration_never_waits_for_the_gpu_not_even_at_a_swap_or_a_new_epoch():
    cfg = pg.parse_args(['--n_pairs=4', '--K=10'])
    dev = torch.device('cuda')
    pg.check_losses()
    pg.check_backward(cfg, 784)
    G, D = pg.make_pairs(cfg, 784, dev, torch.float32)
    batches = pg.Batches(torch.randint(0, 256, (200, 784), dtype=torch.uint8, device=dev), 32, 1)  # 6 batches an epoch
    noise = torch.Generator(device=dev).manual_seed(0)
    recent = torch.zeros(cfg['log_every'], 4, 4, device=dev)
    recent[0] = pg.gap_iteration(0, G, D, batches, noise, cfg)[0]  # Adam's first step creates its state
    swaps = 0
    torch.cuda.set_sync_debug_mode('error')  # any host-device synchronisation raises
    try:
        for it in range(1, 40):
            recent[it], partners = pg.gap_iteration(it, G, D, batches, noise, cfg)
            swaps += partners is not None
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert swaps == 3
    assert torch.isfinite(recent[:40]).all()


def test_a_run_on_the_gpu_evaluates_and_resumes_exactly(tiny_mnist, tmp_path):
    def run(out, *args):
        result = run_script(f'--data_root={tiny_mnist}', f'--out_dir={tmp_path / out}', '--log_every=20',
                            '--sample_every=100', '--device=cuda', *args, timeout=300)
        assert result.returncode == 0, result.stderr
        return result

    whole = run('whole', '--iterations=201', '--eval_every=100', '--eval_samples=500',
                f'--classifier_dir={tmp_path / "classifiers"}')
    assert 'device cuda' in whole.stdout
    assert {'000.png', '002.png', 'metrics.csv', 'metrics.png', 'checkpoint.pt'} <= set(os.listdir(tmp_path / 'whole'))
    run('split', '--iterations=101', '--eval_every=0')
    run('split', '--iterations=201', '--eval_every=0', '--resume=True')
    a, b = load(tmp_path / 'whole' / 'checkpoint.pt'), load(tmp_path / 'split' / 'checkpoint.pt')
    assert torch.equal(a['history'], b['history'])
    assert all(torch.equal(a['G']['model'][k], b['G']['model'][k]) for k in a['G']['model'])

    on_cpu = run_script(f'--data_root={tiny_mnist}', f'--out_dir={tmp_path / "split"}', '--iterations=301',
                        '--device=cpu', '--resume=True')
    assert on_cpu.returncode == 2 and '--device=cuda' in on_cpu.stderr


@pytest.fixture(scope='module')
def mnist_5000(tmp_path_factory):
    """A toy MNIST big enough for long quiet stretches (156 batches an epoch)."""
    from conftest import make_mnist
    return make_mnist(tmp_path_factory.mktemp('mnist_5000'), train=5000, test=100)


def cuda_run(root, out, *args):
    assert pg.train(pg.parse_args([f'--data_root={root}', f'--out_dir={out}', '--device=cuda', '--eval_every=0',
                                   *[str(a) for a in args]])) == 0
    return load(os.path.join(out, 'checkpoint.pt'))


def assert_same_run(a, b):
    assert torch.equal(a['history'], b['history'])
    for side in ('G', 'D'):
        for name, value in a[side]['model'].items():
            assert torch.equal(value, b[side]['model'][name]), f'{side}.{name}'
        for i, state in a[side]['solver']['state'].items():
            for key, value in state.items():
                assert torch.equal(value, b[side]['solver']['state'][i][key]), f'{side} Adam {i} {key}'
    assert a['pairing'] == b['pairing'] and torch.equal(a['noise_rng'], b['noise_rng'])


@pytest.mark.parametrize('dtype', ['float32', 'float64'])
@pytest.mark.parametrize('K, n_pairs', [(10, 2), (0, 4), (100, 8)])
def test_cuda_graphs_give_the_eager_loop_bit_for_bit(mnist_5000, tmp_path, dtype, K, n_pairs):
    """Through swaps, epoch ends (every 156 iterations) and log lines, with blocks of 64, 16, 4 and 1."""
    common = ['--iterations=701', '--log_every=250', '--sample_every=300', f'--K={K}', f'--n_pairs={n_pairs}',
              f'--dtype={dtype}']
    eager = cuda_run(mnist_5000, tmp_path / 'eager', *common, '--cuda_graphs=False')
    graphed = cuda_run(mnist_5000, tmp_path / 'graphed', *common)
    assert_same_run(eager, graphed)


def test_a_graphed_run_resumes_exactly(mnist_5000, tmp_path):
    common = ['--log_every=100', '--sample_every=200', '--K=50']
    whole = cuda_run(mnist_5000, tmp_path / 'whole', *common, '--iterations=900', '--cuda_graphs=False')
    cuda_run(mnist_5000, tmp_path / 'split', *common, '--iterations=401')  # ends on a log line, as `whole` logs
    split = cuda_run(mnist_5000, tmp_path / 'split', *common, '--iterations=900', '--resume=True')
    assert_same_run(whole, split)


def test_graph_replays_never_wait_for_the_gpu(mnist_5000):
    cfg = pg.parse_args(['--n_pairs=2', '--K=100', '--log_every=1000', '--iterations=100000'])
    pg.check_losses()
    pg.check_backward(cfg, 784)
    dev = torch.device('cuda')
    images, _ = pg.load_images('mnist', mnist_5000)
    G, D = pg.make_pairs(cfg, 784, dev, torch.float32)
    batches = pg.Batches(images.to(dev), 32, 1)
    advance = pg.iteration_runner(G, D, batches, torch.Generator(device=dev).manual_seed(0), cfg, None)
    it, lengths = -1, []
    while it < 2000:  # captures every block size it needs
        stats, _ = advance(it + 1)
        it += len(stats)
    torch.cuda.set_sync_debug_mode('error')
    try:
        while it < 3200:  # swaps, epoch ends, replays
            stats, _ = advance(it + 1)
            it += len(stats)
            lengths.append(len(stats))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert max(lengths) == 64 and sum(lengths) / len(lengths) > 5  # mostly replays
