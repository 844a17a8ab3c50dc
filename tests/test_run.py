"""The script run as a user runs it: outputs, repeatability, checkpoints, resume, and clear failures."""
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import parallel_gan as pg
from conftest import SCRIPT, SHARED_MNIST, ctrl_c_at, load, run_script, stopped, train

SMALL = ['--h_dim=32', '--log_every=1', '--eval_every=0']  # small networks; every iteration's losses logged


def run_ok(*args):
    result = run_script(*args)
    assert result.returncode == 0, result.stderr
    return result


def history(out):
    """The log's rows, {'iteration': it, name: every pair's mean}, one per log line."""
    return load(os.path.join(out, 'checkpoint.pt'))['log']['history']


def assert_same_run(a, b):
    """Two checkpoints of the same state, bit for bit: log, weights, optimiser states, origins, swaps, streams."""
    assert a['log']['history'] == b['log']['history'] and a['iteration'] == b['iteration']
    for side in ('G', 'D'):
        for name, value in a['pairs'][side]['model'].items():
            assert torch.equal(value, b['pairs'][side]['model'][name]), f'{side}.{name}'
        for i, state in a['pairs'][side]['optimizer']['state'].items():
            for key, value in state.items():
                assert torch.equal(value, b['pairs'][side]['optimizer']['state'][i][key]), f'{side} optimizer {i} {key}'
        assert a['pairs'][side]['origin'] == b['pairs'][side]['origin']
    assert a['swaps'] == b['swaps'] and torch.equal(a['noise_rng'], b['noise_rng'])


def test_a_run_writes_samples_losses_and_a_checkpoint(tiny_mnist, tmp_path):
    out = tmp_path / 'out'
    result = run_ok(f'--data_root={tiny_mnist}', f'--out_dir={out}', '--iterations=250', '--sample_every=100',
                    '--log_every=50', '--eval_every=0')
    assert sorted(os.listdir(out)) == ['.lock', '000.png', '001.png', '002.png', '003.png', 'checkpoint.pt',
                                       'losses.png']  # .lock: unlocked once the run ended, it blocks nothing
    logs = [line for line in result.stdout.splitlines() if line.startswith('it ')]
    assert [int(line.split()[1]) for line in logs] == [0, 50, 100, 150, 200, 249]
    assert all('it/s' in line and 'left' in line and line.count('/') >= 5 for line in logs[1:])
    assert logs[0].endswith('first iteration')
    state = load(out / 'checkpoint.pt')
    assert state['iteration'] == 249 and state['hyperparameters']['iterations'] == 250
    rows = state['log']['history']
    assert [row['iteration'] for row in rows] == [0, 50, 100, 150, 200, 249]
    assert all(list(row) == ['iteration', 'D_loss', 'G_loss', 'D(x)', 'D(G(z))'] for row in rows)
    assert all(len(row[name]) == 2 for row in rows for name in state['log']['names'])
    assert sorted(state['pairs']['D']['origin']) == [0, 1]
    from PIL import Image
    width, height = Image.open(out / '000.png').size
    assert width > height  # two 4x4 grids side by side


def test_the_same_seed_gives_the_same_losses_and_another_seed_does_not(tiny_mnist, tmp_path):
    runs = {}
    for name, seed in (('a', 3), ('b', 3), ('c', 4)):
        train(f'--data_root={tiny_mnist}', f'--out_dir={tmp_path / name}', '--iterations=40', f'--seed={seed}', *SMALL)
        runs[name] = history(tmp_path / name)
    assert runs['a'] == runs['b'] and len(runs['a']) == 40
    assert runs['a'] != runs['c']


@pytest.mark.parametrize('conditions', [[], ['--paper=True', '--K=5']], ids=['blog', 'paper'])
def test_resume_continues_exactly_as_the_uninterrupted_run(tiny_mnist, tmp_path, capsys, monkeypatch, conditions):
    """blog: stopped by reaching --iterations=35, resumed with 70. paper: stopped by a Ctrl-C after iteration 34 of 70
    (a run with another length would decay its input noise on another schedule), resumed as it was."""
    common = [f'--data_root={tiny_mnist}', '--K=10', '--n_pairs=3', '--sample_every=20', *SMALL, *conditions]
    train(*common, f'--out_dir={tmp_path / "whole"}', '--iterations=70')
    if conditions:
        ctrl_c_at(monkeypatch, 34)
        assert train(*common, f'--out_dir={tmp_path / "split"}', '--iterations=70') == 130
        monkeypatch.undo()
    else:
        train(*common, f'--out_dir={tmp_path / "split"}', '--iterations=35')
    train(*common, f'--out_dir={tmp_path / "split"}', '--iterations=70', '--resume=True')
    assert re.search(r'resumed from \S+ after iteration 34\b', capsys.readouterr().out)
    whole, split = load(tmp_path / 'whole' / 'checkpoint.pt'), load(tmp_path / 'split' / 'checkpoint.pt')
    K = 5 if conditions else 10
    assert len(whole['log']['history']) == 70 and whole['swaps'] == list(range(K, 70, K))
    assert_same_run(whole, split)



@pytest.mark.parametrize('option', [['--same_init=True', '--own_noise=True'], ['--swap_moves=weights']],
                         ids=['same_init', 'swap_moves=weights'])
def test_the_authors_options_resume_exactly_and_are_kept_in_the_checkpoint(tiny_mnist, tmp_path, option):
    """A run with one of the authors' choices stopped after iteration 14 and resumed equals the uninterrupted run."""
    common = [f'--data_root={tiny_mnist}', '--K=5', '--n_pairs=3', '--sample_every=10', *SMALL, *option]
    train(*common, f'--out_dir={tmp_path / "whole"}', '--iterations=30')
    train(*common, f'--out_dir={tmp_path / "split"}', '--iterations=15')
    train(*common, f'--out_dir={tmp_path / "split"}', '--iterations=30', '--resume=True')
    whole, split = load(tmp_path / 'whole' / 'checkpoint.pt'), load(tmp_path / 'split' / 'checkpoint.pt')
    assert whole['swaps'] == [5, 10, 15, 20, 25]
    assert_same_run(whole, split)
    name, value = option[0][2:].split('=')
    assert str(split['hyperparameters'][name]) == value


def test_swap_moves_changes_nothing_in_a_run_without_swaps(tiny_mnist, tmp_path):
    """K=0: swap_moves acts at a swap alone, so the study shares such K=0 runs between parts (sweep.SAME_K0_RUNS)."""
    common = [f'--data_root={tiny_mnist}', '--K=0', '--sample_every=10', '--iterations=12', '--paper=True', *SMALL]
    for moves in ('network', 'weights'):
        train(*common, f'--out_dir={tmp_path / moves}', f'--swap_moves={moves}')
    assert_same_run(load(tmp_path / 'network' / 'checkpoint.pt'), load(tmp_path / 'weights' / 'checkpoint.pt'))

def test_grids_keep_their_order_when_a_resume_changes_sample_every(tiny_mnist, tmp_path):
    """Grids are numbered in the order the run wrote them: a resume with another sample_every goes on after the
    last (003.png), and never writes over an earlier grid."""
    out, common = tmp_path / 'out', [f'--data_root={tiny_mnist}', f'--out_dir={tmp_path / "out"}', *SMALL]
    train(*common, '--iterations=21', '--sample_every=10')
    first = (out / '001.png').read_bytes()
    train(*common, '--iterations=26', '--sample_every=100', '--resume=True')
    assert sorted(f for f in os.listdir(out) if f[0].isdigit()) == ['000.png', '001.png', '002.png', '003.png']
    assert (out / '001.png').read_bytes() == first and load(out / 'checkpoint.pt')['grids'] == 3


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(tiny_mnist, tmp_path):
    """A real SIGINT to the script as a user runs it; the runs around it in this process, with the same threads."""
    common = [f'--data_root={tiny_mnist}', '--h_dim=16', '--log_every=7', '--sample_every=300', '--iterations=500',
              '--eval_every=0', '--threads=1']
    train(*common, f'--out_dir={tmp_path / "whole"}')

    out = tmp_path / 'split'
    proc = subprocess.Popen([sys.executable, SCRIPT, *common, f'--out_dir={out}'], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith('it ') and int(line.split()[1]) >= 60:
            break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and 'interrupted: checkpoint saved after iteration' in rest
    stopped = load(out / 'checkpoint.pt')['iteration']
    assert 60 <= stopped < 499
    assert (out / 'losses.png').exists()
    train(*common, f'--out_dir={out}', '--resume=True')
    assert history(tmp_path / 'whole') == history(out)


def test_a_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    path = str(tmp_path / 'checkpoint.pt')
    pg.save_checkpoint(path, {'iteration': 1, 'weights': torch.ones(3)})

    def crash_midway(obj, f):
        f.write(b'half a checkpoint')
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', crash_midway)
    with pytest.raises(pg.WriteFailed, match='disk full'):
        pg.save_checkpoint(path, {'iteration': 2, 'weights': torch.zeros(3)})
    assert os.listdir(tmp_path) == ['checkpoint.pt']  # no temporary file left behind
    state = torch.load(path, weights_only=True)
    assert state['iteration'] == 1 and torch.equal(state['weights'], torch.ones(3))


def test_resume_refuses_a_damaged_checkpoint_a_missing_one_other_networks_and_another_device(tiny_mnist, tmp_path, capsys):
    data, out = f'--data_root={tiny_mnist}', f'--out_dir={tmp_path / "out"}'
    code, message = stopped(capsys, data, out, '--resume=True')
    assert code == 2 and 'no checkpoint' in message

    train(data, out, '--iterations=5', *SMALL)
    checkpoint = tmp_path / 'out' / 'checkpoint.pt'
    good = checkpoint.read_bytes()
    code, message = stopped(capsys, data, out, '--iterations=9', '--resume=True', '--h_dim=64')
    assert code == 2 and 'h_dim=32 there, 64 now' in message

    state = load(checkpoint)
    torch.save({**state, 'device': 'cuda'}, checkpoint)
    code, message = stopped(capsys, data, out, '--iterations=9', '--resume=True', *SMALL)
    assert code == 2 and 'written on the cuda' in message and '--device=cuda' in message

    for damaged in (good[:len(good) // 2], b'not a checkpoint at all'):
        checkpoint.write_bytes(damaged)
        code, message = stopped(capsys, data, out, '--iterations=9', '--resume=True', *SMALL)
        assert code == 2 and 'damaged' in message


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_mnist, tmp_path, capsys):
    data, out = f'--data_root={tiny_mnist}', f'--out_dir={tmp_path / "out"}'
    train(data, out, '--iterations=20', *SMALL)
    good = (tmp_path / 'out' / 'checkpoint.pt').read_bytes()
    code, message = stopped(capsys, data, out, '--iterations=60', '--resume=True', '--lr=1e30', '--sample_every=5',
                            *SMALL)
    assert code == 1 and 'became non-finite at iteration 2' in message and 'of pair' in message
    assert (tmp_path / 'out' / 'checkpoint.pt').read_bytes() == good


def test_missing_data_offline_gives_one_clear_message(tmp_path):
    offline = {'http_proxy': 'http://127.0.0.1:9', 'https_proxy': 'http://127.0.0.1:9'}
    result = run_script(f'--data_root={tmp_path / "nothing"}', f'--out_dir={tmp_path / "out"}', env=offline)
    assert result.returncode == 1
    assert 'Traceback' not in result.stderr and result.stdout.count('\n') <= 1
    assert str(tmp_path / 'nothing' / 'MNIST' / 'raw') in result.stderr
    for name in pg.MNIST_FILES:
        assert name in result.stderr
    assert not (tmp_path / 'nothing').exists()  # no empty folders left behind to look like a half-done download


def test_a_truncated_data_file_gives_the_same_message(tiny_mnist, tmp_path):
    root = tmp_path / 'data'
    shutil.copytree(tiny_mnist, root)
    images = root / 'MNIST' / 'raw' / 'train-images-idx3-ubyte'
    images.write_bytes(images.read_bytes()[:5000])
    result = run_script(f'--data_root={root}', f'--out_dir={tmp_path / "out"}')
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert 'could not load MNIST' in result.stderr and 'train-images-idx3-ubyte' in result.stderr


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_MNIST, 'MNIST', 'raw')), reason='real MNIST not present')
def test_a_short_run_on_real_mnist(tmp_path):
    out = tmp_path / 'out'
    assert train(f'--data_root={SHARED_MNIST}', f'--out_dir={out}', '--iterations=301', '--sample_every=100',
                 '--log_every=100', '--eval_every=0') == 0
    assert {'000.png', '001.png', '002.png', '003.png', 'losses.png', 'checkpoint.pt'} <= set(os.listdir(out))
    state = load(out / 'checkpoint.pt')
    assert state['iteration'] == 300 and state['data']['order'].shape == (60000,)


def test_a_try_run_shorter_than_eval_every_skips_the_classifier_and_says_how_to_get_metrics(tiny_mnist, tmp_path,
                                                                                            monkeypatch, capsys):
    """The first run of a new user: only iterations changed (eval_every stays 10,000). No classifier, no metrics;
    the log says how to get them. Asked for (eval_at_end), one evaluation at the end, even with eval_every=0."""
    real_load = pg.load_classifier
    monkeypatch.setattr(pg, 'load_classifier', lambda *args: pytest.fail('a try-run trained or loaded the classifier'))
    common = [f'--data_root={tiny_mnist}', '--h_dim=16', '--iterations=30', '--sample_every=10', '--log_every=10']
    assert train(*common, f'--out_dir={tmp_path / "try"}') == 0
    assert sorted(os.listdir(tmp_path / 'try')) == ['.lock', '000.png', '001.png', '002.png', '003.png',
                                                    'checkpoint.pt', 'losses.png']
    assert 'add --eval_at_end=True' in capsys.readouterr().out

    monkeypatch.setattr(pg, 'load_classifier', real_load)
    assert train(*common, f'--out_dir={tmp_path / "asked"}', '--eval_every=0', '--eval_at_end=True',
                 '--eval_samples=100', f'--classifier_dir={tmp_path / "cls"}') == 0
    assert [int(r['iteration']) for r in pg.read_csv(tmp_path / 'asked' / 'metrics.csv')] == [29, 29]
    assert 'eval_at_end' not in capsys.readouterr().out


def test_resume_alone_continues_the_run_with_its_own_hyperparameters(tiny_mnist, tmp_path, monkeypatch, capsys):
    """A run started with other settings than the block's (data, pairs, K, seed, length, ...), stopped by Ctrl-C,
    goes on with --resume=True alone (and its out_dir) exactly as the uninterrupted run; once done, a resume says
    there is nothing to train under the run's own length."""
    settings = [f'--data_root={tiny_mnist}', '--n_pairs=4', '--K=5', '--seed=3', '--h_dim=16', '--iterations=40',
                '--sample_every=10', '--log_every=4', '--eval_every=0']
    train(*settings, f'--out_dir={tmp_path / "whole"}')
    ctrl_c_at(monkeypatch, 17)
    assert train(*settings, f'--out_dir={tmp_path / "split"}') == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert train(f'--out_dir={tmp_path / "split"}', '--resume=True') == 0
    assert 'after iteration 17, with its own hyperparameters' in capsys.readouterr().out
    whole, split = load(tmp_path / 'whole' / 'checkpoint.pt'), load(tmp_path / 'split' / 'checkpoint.pt')
    assert_same_run(whole, split)
    assert {k: v for k, v in split['hyperparameters'].items() if k not in ('out_dir', 'resume')} == \
           {k: v for k, v in whole['hyperparameters'].items() if k not in ('out_dir', 'resume')}

    assert train(f'--out_dir={tmp_path / "split"}', '--resume=True') == 0
    out = capsys.readouterr().out
    assert 'nothing to train' in out and 'already reached --iterations=40' in out and 'loading' not in out


def test_an_edited_random_swap_schedule_resumes_exactly_and_is_what_losses_png_draws(tiny_mnist, tmp_path):
    """swaps_at edited to swap at random (about one iteration in eight, drawn from a generator seeded by the run's seed
    and the iteration alone, as new_partners draws its pairing): the loop follows it, the checkpoint records the swaps
    it made, and a run stopped and resumed equals the uninterrupted one."""
    from conftest import edited_copy
    edited, _ = edited_copy(tmp_path, (
        "return cfg['K'] > 0 and it > 0 and it % cfg['K'] == 0",
        "return it > 0 and bool(torch.rand(1, generator=torch.Generator().manual_seed((cfg['seed'] * 1_000_003 + it) * 31 "
        "+ 2)) < 0.125)"))
    common = [f'--data_root={tiny_mnist}', '--n_pairs=3', '--sample_every=20', *SMALL]
    for out, iterations, resume in (('whole', 70, False), ('split', 35, False), ('split', 70, True)):
        assert edited.train(edited.parse_args([*common, f'--out_dir={tmp_path / out}', f'--iterations={iterations}',
                                               f'--resume={resume}'])) == 0
    whole, split = load(tmp_path / 'whole' / 'checkpoint.pt'), load(tmp_path / 'split' / 'checkpoint.pt')
    cfg = edited.parse_args(['--n_pairs=3'])
    assert whole['swaps'] == [it for it in range(70) if edited.swaps_at(it, cfg)] == split['swaps']
    assert 4 <= len(whole['swaps']) and whole['swaps'] != list(range(8, 70, 8))
    assert_same_run(whole, split)


RANDOM_EDIT = ("""    stats = train_step(G, D, z, x, y, input_noise, cfg['clip'])""",
               """    keep = (torch.rand(x.shape[-2], 1, generator=noise_rng, device=noise_rng.device) < 0.9).to(dtype)
    stats = train_step(G, D, z, x * keep, y, input_noise, cfg['clip'])""")  # drops a tenth of the real batch at random


@pytest.mark.parametrize('stream', ['noise_rng', 'global'])
def test_a_random_edit_resumes_exactly_when_it_draws_from_the_seeded_streams(tiny_mnist, tmp_path, stream):
    """An edit of gap_iteration that draws from noise_rng (kept in the checkpoint) resumes bit for bit; one that
    draws from torch's global generator, which no checkpoint keeps, does not."""
    from conftest import edited_copy
    old, new = RANDOM_EDIT
    edited, _ = edited_copy(tmp_path, (old, new if stream == 'noise_rng' else new.replace(
        'generator=noise_rng, device=noise_rng.device', 'device=noise_rng.device')))
    common = [f'--data_root={tiny_mnist}', '--K=10', '--sample_every=20', *SMALL]
    for out, iterations, resume in (('whole', 60, False), ('split', 30, False), ('split', 60, True)):
        torch.manual_seed(123 + resume)  # the global generator: wherever a fresh process would leave it
        assert edited.train(edited.parse_args([*common, f'--out_dir={tmp_path / out}', f'--iterations={iterations}',
                                               f'--resume={resume}'])) == 0
    whole, split = load(tmp_path / 'whole' / 'checkpoint.pt'), load(tmp_path / 'split' / 'checkpoint.pt')
    assert (whole['log']['history'] == split['log']['history']) == (stream == 'noise_rng')


def test_the_tests_find_real_mnist_through_gap_mnist(tmp_path, monkeypatch):
    """$GAP_MNIST points the tests that need real MNIST at your own copy; without it, ../shared/mnist."""
    import importlib.util
    here = os.path.dirname(os.path.abspath(__file__))

    def found():  # a fresh copy of conftest, as a new pytest session would import it
        spec = importlib.util.spec_from_file_location('conftest_again', os.path.join(here, 'conftest.py'))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.SHARED_MNIST
    monkeypatch.setenv('GAP_MNIST', str(tmp_path))
    assert found() == str(tmp_path)
    monkeypatch.delenv('GAP_MNIST')
    assert os.path.normpath(found()) == os.path.normpath(os.path.join(here, '..', '..', 'shared', 'mnist'))


def flushed():
    """Whether this thread's float arithmetic flushes denormals to 0 now (1e-30 * 1e-10 is a float32 denormal)."""
    return (torch.tensor([1e-30]) * torch.tensor([1e-10])).item() == 0.0


def test_a_cpu_run_trains_with_denormals_flushed_and_resumes_bit_for_bit(tiny_mnist, tmp_path, monkeypatch):
    """Flushed in every iteration of a fresh and a resumed run, and no longer once train() returns."""
    states, step = [], pg.gap_iteration
    monkeypatch.setattr(pg, 'gap_iteration', lambda *args: states.append(flushed()) or step(*args))
    common = [f'--data_root={tiny_mnist}', '--K=5', '--sample_every=10', *SMALL]
    train(*common, f'--out_dir={tmp_path / "whole"}', '--iterations=30')
    train(*common, f'--out_dir={tmp_path / "split"}', '--iterations=14')
    train(*common, f'--out_dir={tmp_path / "split"}', '--iterations=30', '--resume=True')
    assert states == [True] * 60 and not flushed()
    assert_same_run(load(tmp_path / 'whole' / 'checkpoint.pt'), load(tmp_path / 'split' / 'checkpoint.pt'))


KEPT_DENORMALS = '''
import sys, torch
sys.path.insert(0, sys.argv[1])
import parallel_gan as pg
kept, step = [], pg.gap_iteration
def probed(*args):  # doubling 2**20 denormals spans torch's threads: each that does not flush keeps its share
    kept.append(int((torch.ones(1 << 20, dtype=torch.int32).view(torch.float32) * 2).count_nonzero()))
    return step(*args)
pg.gap_iteration = probed
status = pg.main(sys.argv[2:])
print(status, kept)
'''


def test_a_command_line_run_flushes_denormals_in_every_thread(tiny_mnist, tmp_path):
    """torch's worker threads take the setting from the thread that starts them: a run that set it after torch's
    first parallel work would flush in one thread only, and the share of the others would stay slow."""
    result = subprocess.run([sys.executable, '-c', KEPT_DENORMALS, os.path.dirname(SCRIPT), f'--data_root={tiny_mnist}',
                             f'--out_dir={tmp_path}', '--iterations=3', '--threads=2', *SMALL],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == '0 [0, 0, 0]'
