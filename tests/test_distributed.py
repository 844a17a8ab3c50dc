"""GAP across processes: torchrun with 2 gloo processes, one pair each."""
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import nullcontext

import pytest
import torch

import parallel_gan as pg
from conftest import ROOT, SCRIPT, load

COMMON = ['--dtype=float64', '--K=10', '--h_dim=32', '--log_every=1', '--sample_every=40', '--eval_every=0',
          '--threads=1']


def torchrun(*args, **kwargs):
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', SCRIPT, *args]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def logged(state):
    """A checkpoint's log as one tensor (log lines, statistics, pairs)."""
    names = state['log']['names']
    return torch.tensor([[row[name] for name in names] for row in state['log']['history']], dtype=torch.float64)


def finish(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.mark.parametrize('conditions, iterations, split', [
    ([], 150, 80),
    (['--paper=True', '--n_pairs=4', '--K=5', '--layers=2', '--pack=2'], 70, 70),  # every condition, matching swaps
    # over processes, and PacGAN's packs
], ids=['blog', 'paper'])  # paper: no resume here, which would change its input noise's schedule (test_run's resumes it)
def test_two_processes_with_a_resume_give_the_single_process_losses(tiny_mnist, tmp_path, conditions, iterations, split):
    data = f'--data_root={tiny_mnist}'
    pg.train(pg.parse_args([data, *COMMON, *conditions, f'--out_dir={tmp_path / "single"}', f'--iterations={iterations}']))

    out = f'--out_dir={tmp_path / "two"}'
    code, log, err = finish(torchrun(data, *COMMON, *conditions, out, f'--iterations={split}'))
    assert code == 0, err
    assert log.count('GAP: ') == 1 and '2 processes x 1 thread,' in log  # one process writes
    assert len([line for line in log.splitlines() if line.startswith('it ')]) == split
    if split < iterations:
        code, log, err = finish(torchrun(data, *COMMON, *conditions, out, f'--iterations={iterations}', '--resume=True'))
        assert code == 0, err
        assert 'resumed from' in log and f'after iteration {split - 1}' in log

    single, two = load(tmp_path / 'single' / 'checkpoint.pt'), load(tmp_path / 'two' / 'checkpoint.pt')
    assert two['pairs']['G']['model']['0.weight'].dtype == torch.float64
    assert len(two['log']['history']) == iterations and two['log']['names'] == single['log']['names']
    assert len(two['swaps']) >= 12 and two['swaps'] == single['swaps']  # a dozen swaps and more
    assert torch.allclose(logged(two), logged(single), rtol=0, atol=1e-9)
    for side in ('G', 'D'):
        for name, value in single['pairs'][side]['model'].items():
            assert torch.allclose(two['pairs'][side]['model'][name], value, rtol=0, atol=1e-9)
        for i, moments in single['pairs'][side]['optimizer']['state'].items():
            for key in ('exp_avg', 'exp_avg_sq'):
                assert torch.allclose(two['pairs'][side]['optimizer']['state'][i][key], moments[key], rtol=0, atol=1e-9)
        assert two['pairs'][side]['origin'] == single['pairs'][side]['origin']
    assert sorted(os.listdir(tmp_path / 'two')) == sorted(os.listdir(tmp_path / 'single'))


def test_pairs_must_spread_evenly_over_the_processes(tiny_mnist, tmp_path):
    code, _, err = finish(torchrun(f'--data_root={tiny_mnist}', f'--out_dir={tmp_path}', '--n_pairs=3'))
    assert code != 0 and 'cannot be spread evenly over 2 processes' in err


def test_when_a_process_dies_the_other_stops_with_a_message_and_the_checkpoint_survives(tiny_mnist, tmp_path):
    proc = torchrun(f'--data_root={tiny_mnist}', f'--out_dir={tmp_path}', '--iterations=1000000', '--h_dim=32',
                    '--log_every=10', '--sample_every=20', '--eval_every=0', '--threads=1')
    checkpoint = tmp_path / 'checkpoint.pt'
    deadline = time.time() + 60
    while not (checkpoint.exists() and load(checkpoint)['iteration'] >= 40) and time.time() < deadline:
        time.sleep(0.5)
    workers = subprocess.run(['pgrep', '-P', str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[-1]), signal.SIGKILL)
    killed = time.time()
    code, _, err = finish(proc, timeout=90)
    assert code != 0 and time.time() - killed < 60
    assert 'lost the other processes' in err and 'checkpoint' in err
    state = load(checkpoint)  # intact, and a state the run really passed through
    assert state['iteration'] % 20 == 0 and state['iteration'] >= 40



def test_ctrl_c_under_torchrun_stops_every_process_at_the_next_log_line_with_a_checkpoint(tiny_mnist, tmp_path):
    """Ctrl-C reaches torchrun, which passes SIGINT on to its processes (each in a session of its own)."""
    proc = torchrun(f'--data_root={tiny_mnist}', f'--out_dir={tmp_path}', '--iterations=1000000', '--h_dim=32',
                    '--log_every=25', '--sample_every=1000', '--eval_every=0', '--threads=1', start_new_session=True)
    try:
        for line in proc.stdout:
            if line.startswith('it ') and int(line.split()[1]) >= 50:
                break
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C does: to torchrun's whole process group
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    saved = re.search(r'interrupted: checkpoint saved after iteration (\d+);', rest)
    assert saved and rest.count('interrupted:') == 1 and 'lost the other processes' not in err
    state = load(tmp_path / 'checkpoint.pt')
    assert state['iteration'] == int(saved[1]) and state['iteration'] % 25 == 0 and state['iteration'] > 50

@pytest.mark.parametrize('world, failure, after', [(2, RuntimeError('Connection reset by peer'), signal.SIG_IGN),
                                                   (1, RuntimeError('Connection reset by peer'), signal.SIG_DFL),
                                                   (2, None, signal.SIG_DFL), (2, ValueError('bad'), signal.SIG_DFL)])
def test_only_a_failed_collective_leaves_sigterm_ignored_so_the_report_gets_out(world, failure, after, monkeypatch):
    """torchrun sends SIGTERM to the survivors the moment one process dies; it must not kill a survivor
    between its failed collective and its message."""
    monkeypatch.setattr(pg.procs, 'world', world)
    try:
        with pytest.raises(type(failure)) if failure else nullcontext():
            with pg.interrupts_caught():
                assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
                if failure:
                    raise failure
        assert signal.getsignal(signal.SIGTERM) == after
        assert signal.getsignal(signal.SIGINT) == signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
