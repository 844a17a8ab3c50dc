"""The GPU path (skipped without a CUDA device): the training step on the GPU equals the reference loop, and whole
runs evaluate and resume exactly there."""
import os

import pytest
import torch

from conftest import load, run_script
from test_gap import assert_matches_reference
from test_run import assert_same_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')


@pytest.mark.parametrize('options', [{'n_pairs': 2}, {'n_pairs': 4, 'paper': True, 'clip': 0.05, 'layers': 2}],
                         ids=['blog', 'paper'])
def test_the_step_on_the_gpu_equals_the_reference_loop_through_swaps(options):
    """In float64 on the GPU, within 1e-9 of the plain loop (also on the GPU), through a dozen swaps; the paper's
    conditions (each pair its own noise and batch, input noise, batch norm, clipping, matching swaps) included."""
    assert_matches_reference(dev='cuda', iterations=130, h_dim=32, **options)


def test_a_run_on_the_gpu_evaluates_and_resumes_exactly(tiny_mnist, tmp_path):
    def run(out, *args):
        result = run_script(f'--data_root={tiny_mnist}', f'--out_dir={tmp_path / out}', '--log_every=20',
                            '--sample_every=100', '--device=cuda', *args, timeout=300)
        assert result.returncode == 0, result.stderr
        return result

    whole = run('whole', '--iterations=201', '--eval_every=100', '--eval_samples=500',
                f'--classifier_dir={tmp_path / "classifiers"}')
    assert 'device cuda' in whole.stdout and 'eval   200 |' in whole.stdout
    assert {'000.png', '002.png', 'metrics.csv', 'metrics.png', 'checkpoint.pt'} <= set(os.listdir(tmp_path / 'whole'))
    run('split', '--iterations=101', '--eval_every=0')  # stops on a log line, as `whole` logs
    run('split', '--iterations=201', '--eval_every=0', '--resume=True')
    a, b = load(tmp_path / 'whole' / 'checkpoint.pt'), load(tmp_path / 'split' / 'checkpoint.pt')
    assert a['device'] == 'cuda' and a['swaps'] == [100, 200]
    assert_same_run(a, b)

    on_cpu = run_script(f'--data_root={tiny_mnist}', f'--out_dir={tmp_path / "split"}', '--iterations=301',
                        '--device=cpu', '--resume=True')
    assert on_cpu.returncode == 2 and '--device=cuda' in on_cpu.stderr
