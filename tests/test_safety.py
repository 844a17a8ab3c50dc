"""Never lose a run: a second run over a finished one, two live runs in one out_dir, changed resumes,
non-finite weights, files that cannot be written, and what the user sees before the slow steps."""
import errno
import glob
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import parallel_gan as pg
from conftest import SCRIPT, ctrl_c_at, edited_copy, load, run_script, stopped, train

SMALL = ['--h_dim=16', '--eval_every=0']


def test_a_second_fresh_run_is_refused_and_says_how_to_go_on_safely(tiny_mnist, tmp_path, capsys):
    """The layout of the defaults: the data and the classifier cached inside out_dir. The refusal names the
    run's own files, all of them and nothing else; removing them lets a fresh run start, with the caches kept."""
    shutil.copytree(tiny_mnist, tmp_path / 'data')
    common = [f'--data_root={tmp_path / "data"}', f'--out_dir={tmp_path}', f'--classifier_dir={tmp_path / "classifiers"}',
              '--h_dim=16', '--eval_at_end=True', '--eval_samples=100', '--sample_every=5']
    train(*common, '--iterations=12')
    before = (tmp_path / 'checkpoint.pt').read_bytes()
    code, message = stopped(capsys, *common, '--iterations=30')
    assert code == 2 and 'stopped after iteration 11' in message
    assert '--resume=True' in message and 'another --out_dir' in message and len(message.splitlines()) == 1
    assert (tmp_path / 'checkpoint.pt').read_bytes() == before
    others = {'data', 'classifiers', '.lock'}  # the caches, and the lock file, which blocks nothing once a run ended
    written = {re.sub(r'^\d{3}\.png$', 'NNN.png', name) for name in os.listdir(tmp_path)} - others
    named = re.fullmatch(r".*remove that run's own files from it \((.*)\)", message).group(1).split(', ')
    assert set(named) == written and len(named) == len(written)
    for name in named:
        for path in glob.glob(str(tmp_path / name.replace('NNN', '[0-9][0-9][0-9]'))):
            os.remove(path)
    assert train(*common, '--iterations=3') == 0
    assert 'classifier (cached in' in capsys.readouterr().out


def test_a_live_run_locks_its_out_dir_until_it_dies_even_by_sigkill(tiny_mnist, tmp_path, capsys):
    common = [f'--data_root={tiny_mnist}', f'--out_dir={tmp_path}', *SMALL, '--log_every=1']
    first = subprocess.Popen([sys.executable, SCRIPT, *common, '--iterations=1000000'], stdout=subprocess.PIPE, text=True)
    try:
        for line in first.stdout:
            if line.startswith('it       1 '):  # after the checkpoint of iteration 0
                break
        code, message = stopped(capsys, *common, '--iterations=10', '--resume=True')
        assert code == 2 and f'in use by another run (process {first.pid})' in message
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert train(*common, '--iterations=10', '--resume=True') == 0  # the dead run's lock blocks nothing


def test_a_resume_may_change_the_log_cadence_and_goes_on_exactly(tiny_mnist, tmp_path, monkeypatch):
    """Interrupted at iteration 31 with 3 unlogged iterations (log_every=7), resumed with log_every=2, another
    sample_every and the same lr: the same weights as the uninterrupted run, and the first log line after the
    resume averages the 3 saved iterations with the new one."""
    common = [f'--data_root={tiny_mnist}', '--K=5', '--n_pairs=3', '--sample_every=20', '--iterations=60', *SMALL]
    train(*common, '--log_every=7', f'--out_dir={tmp_path / "whole"}')
    train(*common, '--log_every=1', f'--out_dir={tmp_path / "every"}')
    ctrl_c_at(monkeypatch, 31)
    assert train(*common, '--log_every=7', f'--out_dir={tmp_path / "split"}') == 130
    monkeypatch.undo()
    assert len(load(tmp_path / 'split' / 'checkpoint.pt')['log']['recent']) == 3
    train(*common, '--log_every=2', '--sample_every=9', '--lr=0.001', f'--out_dir={tmp_path / "split"}', '--resume=True')
    whole, split = load(tmp_path / 'whole' / 'checkpoint.pt'), load(tmp_path / 'split' / 'checkpoint.pt')
    for side in ('G', 'D'):
        for name, value in whole['pairs'][side]['model'].items():
            assert torch.equal(value, split['pairs'][side]['model'][name])
        assert whole['pairs'][side]['origin'] == split['pairs'][side]['origin']
    logged = [row['iteration'] for row in split['log']['history']]
    assert logged == [0, 7, 14, 21, 28] + list(range(32, 60, 2)) + [59]
    every = load(tmp_path / 'every' / 'checkpoint.pt')['log']['history']
    assert [row['iteration'] for row in every[29:33]] == [29, 30, 31, 32]
    names = [name for name in every[0] if name != 'iteration']
    assert names == ['D_loss', 'G_loss', 'D(x)', 'D(G(z))']
    stats = lambda rows: torch.tensor([[row[name] for name in names] for row in rows], dtype=torch.float64)
    assert torch.allclose(stats(split['log']['history'][5:6])[0], stats(every[29:33]).mean(0), atol=1e-6)


@pytest.mark.parametrize('change, named', [(['--K=7'], 'K=5 there, 7 now'), (['--seed=3'], 'seed=0 there, 3 now'),
                                           (['--mb_size=16', '--beta1=0.5'], 'mb_size=32 there, 16 now; beta1=0.9 there, 0.5 now')])
def test_a_resume_refuses_changes_that_would_not_continue_exactly(tiny_mnist, tmp_path, capsys, change, named):
    common = [f'--data_root={tiny_mnist}', f'--out_dir={tmp_path}', '--K=5', *SMALL]
    train(*common, '--iterations=12')
    code, message = stopped(capsys, *common, '--iterations=20', '--resume=True', *change)
    assert code == 2 and named in message and 'may change only the learning rates (lr, lr_*) and iterations' in message
    assert len(message.splitlines()) == 1


def test_non_finite_weights_are_never_saved(tiny_mnist, tmp_path, monkeypatch, capsys):
    """A G update turns a hidden bias into -inf at iteration 12 (that unit's ReLU then passes nothing, so every
    loss stays finite): the save at iteration 15 stops the run, and the checkpoint of iteration 10 stays."""
    step = pg.gap_iteration

    def poisoned(it, pairs, *args, **kwargs):
        result = step(it, pairs, *args, **kwargs)
        if it == 12:
            pairs['G'].model[0].bias.data[0, 0, 0] = -float('inf')
        return result
    common = [f'--data_root={tiny_mnist}', f'--out_dir={tmp_path}', '--sample_every=5', '--log_every=100', *SMALL]
    train(*common, '--iterations=11')
    good = (tmp_path / 'checkpoint.pt').read_bytes()
    monkeypatch.setattr(pg, 'gap_iteration', poisoned)
    code, message = stopped(capsys, *common, '--iterations=30', '--resume=True')
    assert code == 1 and 'a weight of G became non-finite by iteration 15' in message
    assert (tmp_path / 'checkpoint.pt').read_bytes() == good


def test_an_out_dir_that_cannot_be_made_stops_at_once_in_one_line(tmp_path):
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')
    result = run_script(f'--out_dir={blocker / "out"}', f'--data_root={tmp_path / "no_data_here"}')
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert f'cannot use --out_dir={blocker / "out"} (Not a directory)' in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and 'loading' not in result.stdout  # before the data
    assert "No checkpoint had been written" in result.stderr and "intact" not in result.stderr


@pytest.mark.parametrize('which', ['checkpoint', 'sample image'])
def test_a_full_disk_mid_run_stops_cleanly_and_keeps_the_old_checkpoint(tiny_mnist, tmp_path, monkeypatch, capsys, which):
    common = [f'--data_root={tiny_mnist}', f'--out_dir={tmp_path}', '--sample_every=5', *SMALL]
    train(*common, '--iterations=6')
    good = (tmp_path / 'checkpoint.pt').read_bytes()

    def full_disk(*args, **kwargs):
        target = args[1] if which == 'checkpoint' else args[1]
        if hasattr(target, 'write'):
            target.write(b'part of a file')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if which == 'checkpoint':
        monkeypatch.setattr(torch, 'save', full_disk)
    else:
        import matplotlib.figure
        monkeypatch.setattr(matplotlib.figure.Figure, 'savefig', full_disk)
    code, message = stopped(capsys, *common, '--iterations=20', '--resume=True')
    assert code == 1 and 'No space left on device' in message and str(tmp_path) in message
    assert 'The last checkpoint' in message and len(message.splitlines()) == 1
    assert (tmp_path / 'checkpoint.pt').read_bytes() == good
    assert not [name for name in os.listdir(tmp_path) if name.endswith('.tmp')]


def test_the_user_is_told_before_each_slow_step(tiny_mnist, tmp_path, monkeypatch, capsys):
    said_before = {}
    for name, key in (('training_data', 'loading the mnist training set'), ('fit_classifier', 'training the classifier')):
        real = getattr(pg, name)

        def announced(*args, _real=real, _key=key, **kwargs):
            said_before[_key] = _key in capsys.readouterr().out
            return _real(*args, **kwargs)
        monkeypatch.setattr(pg, name, announced)
    train(f'--data_root={tiny_mnist}', f'--out_dir={tmp_path}', f'--classifier_dir={tmp_path / "cls"}', '--h_dim=16',
          '--iterations=3', '--eval_every=2', '--eval_samples=50', '--log_every=1')
    assert said_before == {'loading the mnist training set': True, 'training the classifier': True}
    first = next(line for line in capsys.readouterr().out.splitlines() if line.startswith('it '))
    assert first.startswith('it       0') and first.endswith('first iteration') and 'it/s' not in first


def test_a_resume_may_change_lr_and_the_run_length(tiny_mnist, tmp_path):
    common = [f'--data_root={tiny_mnist}', '--K=5', '--sample_every=10', '--log_every=10', *SMALL]
    train(*common, f'--out_dir={tmp_path / "same"}', '--iterations=40')
    train(*common, f'--out_dir={tmp_path / "slower"}', '--iterations=21')  # ends on a log line
    train(*common, f'--out_dir={tmp_path / "slower"}', '--iterations=40', '--resume=True', '--lr=1e-4',
          '--eval_every=10', '--eval_samples=100', f'--classifier_dir={tmp_path / "cls"}')
    same, slower = load(tmp_path / 'same' / 'checkpoint.pt'), load(tmp_path / 'slower' / 'checkpoint.pt')
    assert slower['iteration'] == 39
    for side in ('G', 'D'):
        assert [g['lr'] for g in slower['pairs'][side]['optimizer']['param_groups']] == [1e-4]
    same, slower = same['log']['history'], slower['log']['history']
    assert [row['iteration'] for row in slower] == [row['iteration'] for row in same] == [0, 10, 20, 30, 39]
    assert same[:3] == slower[:3]  # the same run up to the resume
    assert same[-1]['D_loss'] != pytest.approx(slower[-1]['D_loss'])  # then a slower one
    assert (tmp_path / 'slower' / 'metrics.csv').exists()


@pytest.mark.parametrize('ending', ['an error', 'sys.exit', 'Ctrl-C', 'Ctrl-C while loading'])
def test_the_lock_goes_however_the_run_ends(tiny_mnist, tmp_path, monkeypatch, ending):
    """Short of kill -9 (above): an exception, a sys.exit, a Ctrl-C in the loop (saved, status 130) or before it.
    Afterwards the .lock file it leaves blocks nothing: out_dir can be claimed again, and SIGTERM has its default
    handler back."""
    load_data = pg.training_data

    def loading(*args):
        if ending == 'an error':
            raise RuntimeError('boom')
        if ending == 'sys.exit':
            sys.exit('stopped')
        os.kill(os.getpid(), signal.SIGINT)
        return load_data(*args)

    if ending == 'Ctrl-C':
        ctrl_c_at(monkeypatch, 3)
    else:
        monkeypatch.setattr(pg, 'training_data', loading)
    args = [f'--data_root={tiny_mnist}', f'--out_dir={tmp_path}', *SMALL, '--iterations=10']
    raised = {'an error': RuntimeError, 'Ctrl-C while loading': KeyboardInterrupt}.get(ending, SystemExit)
    if ending == 'Ctrl-C':
        assert train(*args) == 130
    else:
        with pytest.raises(raised):
            train(*args)
    assert (tmp_path / '.lock').exists()  # left behind, unlocked
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    with pg.claim_out_dir({'out_dir': str(tmp_path), 'resume': True}):
        assert (tmp_path / '.lock').read_text() == f'{os.getpid()}\n'


@pytest.mark.skipif(pg.fcntl is None, reason='no flock here')
def test_a_live_claim_refuses_a_second_run_and_an_ended_ones_lock_file_blocks_nothing(tmp_path, capsys):
    """While a run holds out_dir, another is refused naming its process; once it ended, its .lock stays (with its
    process id) and blocks nothing: the next run claims it and writes its own."""
    cfg = {'out_dir': str(tmp_path), 'resume': True}
    with pg.claim_out_dir(cfg):
        assert (tmp_path / '.lock').read_text() == f'{os.getpid()}\n'
        code, message = stopped(capsys, f'--out_dir={tmp_path}', '--resume=True', *SMALL)
        assert code == 2 and f'in use by another run (process {os.getpid()})' in message
    (tmp_path / '.lock').write_text('12345\n')  # an ended run's
    with pg.claim_out_dir(cfg):
        assert (tmp_path / '.lock').read_text() == f'{os.getpid()}\n'


def test_a_resume_applies_the_changes_given_and_says_them_in_one_line(tiny_mnist, tmp_path, capsys):
    """Only what is given explicitly changes: a resumable change is applied and said; another is refused naming it
    alone (not every setting the run was started with)."""
    train(f'--data_root={tiny_mnist}', f'--out_dir={tmp_path}', '--n_pairs=4', '--K=50', '--seed=3', *SMALL,
          '--iterations=12')
    code, message = stopped(capsys, f'--out_dir={tmp_path}', '--resume=True', '--seed=4')
    assert code == 2 and 'with other settings, which would not continue it exactly (seed=3 there, 4 now)' in message
    capsys.readouterr()
    assert train(f'--out_dir={tmp_path}', '--resume=True', '--iterations=20', '--lr=5e-4') == 0
    said = [line for line in capsys.readouterr().out.splitlines() if 'resumed from' in line]
    assert said == [f'resumed from {tmp_path / "checkpoint.pt"} after iteration 11, with these changes: '
                    f'lr=0.001 there, 0.0005 now; iterations=12 there, 20 now']
    state = load(tmp_path / 'checkpoint.pt')
    assert state['iteration'] == 19 and [g['lr'] for g in state['pairs']['G']['optimizer']['param_groups']] == [5e-4]
    assert (state['hyperparameters']['n_pairs'], state['hyperparameters']['K'], state['hyperparameters']['seed']) == (4, 50, 3)


def test_a_value_edited_in_the_block_since_the_run_counts_as_given(tiny_mnist, tmp_path, capsys):
    """The block as it was is kept in the checkpoint: a value edited there since is a change (applied or refused),
    an unedited one is the run's own, whatever the block says (here the run's n_pairs=3 from its command line)."""
    edits = [('K = 100  #', 'K = 5  #'), ('h_dim = 128  #', 'h_dim = 16  #'), ('eval_every = 10_000  #', 'eval_every = 0  #')]
    (tmp_path / 'a').mkdir(), (tmp_path / 'b').mkdir(), (tmp_path / 'c').mkdir()
    first, _ = edited_copy(tmp_path / 'a', *edits)
    out = f'--out_dir={tmp_path / "out"}'
    first.train(first.parse_args([f'--data_root={tiny_mnist}', out, '--n_pairs=3', '--iterations=12']))
    assert load(tmp_path / 'out' / 'checkpoint.pt')['block']['K'] == 5
    slower, _ = edited_copy(tmp_path / 'b', *edits, ('lr = 1e-3  #', 'lr = 5e-4  #'))
    cfg = slower.parse_args([out, '--resume=True', '--iterations=20'])
    assert slower.explicit == {'out_dir', 'resume', 'iterations', 'lr'}
    assert (cfg['lr'], cfg['n_pairs'], cfg['data_root']) == (5e-4, 3, tiny_mnist)
    capsys.readouterr()
    assert slower.train(cfg) == 0
    assert 'with these changes: lr=0.001 there, 0.0005 now; iterations=12 there, 20 now' in capsys.readouterr().out
    other_k, _ = edited_copy(tmp_path / 'c', *edits[1:], ('K = 100  #', 'K = 7  #'))
    with pytest.raises(SystemExit) as stop:
        other_k.train(other_k.parse_args([out, '--resume=True', '--iterations=30']))
    message = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and '(K=5 there, 7 now)' in message and len(message.splitlines()) == 1


def test_a_checkpoint_without_its_block_resumes_as_before(tiny_mnist, tmp_path, capsys):
    """Written before checkpoints kept the block: the block and command line alone, compared with the checkpoint."""
    common = [f'--data_root={tiny_mnist}', f'--out_dir={tmp_path}', *SMALL]
    train(*common, '--K=5', '--iterations=12')
    state = load(tmp_path / 'checkpoint.pt')
    del state['block']
    torch.save(state, tmp_path / 'checkpoint.pt')
    code, message = stopped(capsys, *common, '--resume=True', '--iterations=20')
    assert code == 2 and '(K=5 there, 100 now)' in message
    assert train(*common, '--resume=True', '--iterations=20', '--K=5') == 0
