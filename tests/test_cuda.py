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
