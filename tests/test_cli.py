"""The command line: --name=value overrides, --help, the hyperparameter block as users edit it, and refusals
before any work starts."""
import os
import re
import subprocess
import sys

import pytest

import parallel_gan as pg
from conftest import SCRIPT, edited_copy, run_script


def test_defaults_are_the_reference_hyperparameters():
    cfg = pg.parse_args([])
    assert (cfg['mb_size'], cfg['z_dim'], cfg['h_dim'], cfg['lr'], cfg['K']) == (32, 10, 128, 1e-3, 100)
    assert (cfg['iterations'], cfg['log_every'], cfg['sample_every'], cfg['n_pairs']) == (1_000_000, 1000, 1000, 2)
    assert (cfg['device'], cfg['out_dir'], cfg['resume']) == ('auto', 'out', False)


def test_overrides_take_the_type_of_the_default():
    cfg = pg.parse_args(['--K=7', '--lr=0.01', '--resume=true', '--out_dir=elsewhere', '--iterations=2_000'])
    assert cfg['K'] == 7 and cfg['lr'] == 0.01 and cfg['resume'] is True
    assert cfg['out_dir'] == 'elsewhere' and cfg['iterations'] == 2000


def test_help_lists_every_hyperparameter_with_default_and_meaning(capsys):
    with pytest.raises(SystemExit) as exit:
        pg.parse_args(['--help'])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    for name, default, meaning in pg.read_block():
        line = next(line for line in text.splitlines() if line.strip().startswith(f'--{name} '))
        assert repr(default) in line and meaning in line
    names = {name for name, _, _ in pg.read_block()}
    assert {'mb_size', 'z_dim', 'h_dim', 'lr', 'K', 'iterations', 'log_every', 'sample_every', 'n_pairs',
            'seed', 'device', 'data_root', 'out_dir', 'resume'} <= names


@pytest.mark.parametrize('args, words', [
    (['--nope=1'], 'unknown argument'),
    (['K=3'], 'unknown argument'),
    (['--K'], 'unknown argument'),
    (['--K=ten'], 'expected a whole number'),
    (['--iterations=2.5'], 'expected a whole number'),
    (['--iterations=1e400'], 'expected a whole number'),
    (['--lr=fast'], 'expected a number'),
    (['--resume=maybe'], 'expected True or False'),
    (['--K=-1'], 'K must be'),
    (['--mb_size=0'], 'mb_size'),
    (['--n_pairs=0'], 'n_pairs'),
    (['--n_pairs=1'], 'needs n_pairs >= 2'),
    (['--lr=0'], 'lr must be'),
    (['--lr=nan'], 'lr must be'),
    (['--iterations=0'], 'iterations'),
    (['--log_every=0'], 'log_every'),
    (['--sample_every=0'], 'sample_every'),
    (['--z_dim=0'], 'z_dim'),
    (['--h_dim=0'], 'h_dim'),
    (['--threads=-2'], 'threads'),
    (['--dtype=float16'], 'dtype'),
    (['--device=tpu'], 'device'),
    (['--seed=1180591620717411303424'], 'seed must be'),
    (['--seed=-1'], 'seed must be'),
    (['--layers=0'], 'layers must be'),
    (['--beta1=1'], 'beta1 must be'),
    (['--train_size=-3'], 'train_size must be'),
    (['--batch_norm=True', '--mb_size=1'], 'batch_norm needs mb_size'),
    (['--paper=True', '--mb_size=1'], 'batch_norm needs mb_size'),
    (['--swap_moves=moments'], 'swap_moves must be one of network, weights'),
    (['--same_init=True'], 'same_init with every pair on the same noise and batches trains copies of one GAN'),
])
def test_bad_input_is_refused_with_one_line_and_status_2(args, words, capsys):
    with pytest.raises(SystemExit) as exit:
        pg.parse_args(args)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1


def test_a_single_pair_without_swaps_is_accepted():
    assert pg.parse_args(['--n_pairs=1', '--K=0'])['n_pairs'] == 1


def test_the_script_itself_refuses_before_any_work(tmp_path):
    result = run_script('--K=-5', f'--out_dir={tmp_path}/out')
    assert result.returncode == 2
    assert 'K must be' in result.stderr and 'Traceback' not in result.stderr
    assert not (tmp_path / 'out').exists()


def test_the_hyperparameter_block_takes_any_ordinary_assignment(tmp_path, capsys):
    """Edits a user makes in the block: one space before a comment, no comment, expressions, blank lines and
    comment-only lines between entries, a count written as a float."""
    edited, _ = edited_copy(tmp_path, (
        'lr = 1e-3  # learning rate of every network (its optimiser: Adam, in make_pairs)\n',
        'lr = 3e-4 # learning rate of every network (its optimiser: Adam, in make_pairs)\n\n# my notes: try 1e-4 next\n'), (
        'h_dim = 128  # hidden units of every generator and discriminator', 'h_dim = 2 * 64'), (
        'iterations = 1_000_000  # training iterations', 'iterations = 2e5  # training iterations'), (
        "out_dir = 'out'  # where samples, plots and the checkpoint go", "out_dir = 'out'#where samples go"))
    cfg = edited.parse_args([])
    assert cfg['lr'] == 3e-4 and cfg['h_dim'] == 128 and cfg['iterations'] == 200_000 and cfg['out_dir'] == 'out'
    assert type(cfg['iterations']) is int
    assert edited.parse_args(['--lr=0.01', '--h_dim=64', '--iterations=5'])['h_dim'] == 64
    with pytest.raises(SystemExit):
        edited.parse_args(['--help'])
    text = capsys.readouterr().out
    assert re.search(r'--lr\s+0\.0003\s+learning rate of every network \(its optimiser: Adam, in make_pairs\)', text)
    assert re.search(r'--h_dim\s+128\s*$', text, re.M)  # listed, with no meaning to show
    assert re.search(r'--iterations\s+200000\s+training iterations', text)  # a count, shown as one
    assert re.search(r'--out_dir\s+\'out\'\s+where samples go', text)
    assert 'my notes' not in text


def test_help_into_a_reader_that_stopped_early_is_no_error():
    """`--help | head`: a pipe whose reading end is already closed, so that the first write fails, every time."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, SCRIPT, '--help'], stdout=write_end, stderr=subprocess.PIPE, text=True,
                                timeout=60)
    finally:
        os.close(write_end)
    assert result.returncode == 0 and result.stderr == ''


@pytest.mark.parametrize('line, words', [
    ('lr, beta1 = 1e-3, 0.9', 'is not a hyperparameter'),
    ("print('hello')", 'is not a hyperparameter'),
    ('K *= 2', 'is not a hyperparameter'),
    ('lr = [1e-3]', 'lr must be a number, not [0.001]'),
    ('notes = [1e-3]', 'notes must be a number, True/False or a string, not [0.001]'),
])
def test_a_line_the_block_cannot_hold_is_reported_with_its_number(tmp_path, line, words):
    edited, script = edited_copy(tmp_path, ('lr = 1e-3  # learning rate of every network (its optimiser: Adam, in make_pairs)', line))
    number = next(i for i, text in enumerate(open(script).read().splitlines(), 1) if text == line)
    result = subprocess.run([sys.executable, script, '--help'], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert f'line {number}:' in result.stderr and words in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_command_line_takes_the_number_forms_of_the_block():
    cfg = pg.parse_args(['--iterations=1e3', '--K=1_0', '--seed=3.0', '--lr=1', '--eval_every=2E4'])
    assert (cfg['iterations'], cfg['K'], cfg['seed'], cfg['eval_every']) == (1000, 10, 3, 20000)
    assert all(type(cfg[name]) is int for name in pg.COUNTS) and type(cfg['lr']) is float


def test_every_hyperparameter_of_the_block_has_one_kind_and_the_name_lists_name_only_hyperparameters():
    """KINDS_OF gives each name of the block the kind it takes whatever the block holds (a name without one would
    take its edited value's kind, a name in two would take the first); RESUMABLE, NEEDED and POOL_KEYS name only
    hyperparameters, and what fixes the run (K, the seed) cannot change on a resume; every learning rate can."""
    names = [name for name, _, _ in pg.read_block()]
    declared = [name for kind_names in pg.KINDS_OF.values() for name in kind_names]
    assert sorted(names) == sorted(declared) and pg.KINDS_OF[int] == pg.COUNTS
    for name, default, _ in pg.read_block():
        assert pg.kind_of(name, default) is type(default), name
    assert set(pg.RESUMABLE) | set(pg.NEEDED) | set(pg.POOL_KEYS) <= set(names)
    assert not pg.resumable('K') and not pg.resumable('seed') and pg.seeds_alike('seed') and not pg.seeds_alike('K')
    assert pg.resumable('lr') and pg.resumable('lr_D') and pg.seeds_alike('lr_G')
    assert set(names) <= pg.read_anywhere()  # the code reads every shipped name: none is said to change nothing


def test_a_value_of_the_wrong_kind_in_the_block_is_refused_with_its_line_number(tmp_path):
    """As the script runs: one line, exit status 2, no traceback, nothing made."""
    line = "lr = 'fast'  # learning rate of every network (its optimiser: Adam, in make_pairs)"
    _, script = edited_copy(tmp_path, ('lr = 1e-3  # learning rate of every network (its optimiser: Adam, in make_pairs)', line))
    number = open(script).read().splitlines().index(line) + 1
    result = subprocess.run([sys.executable, script, f'--out_dir={tmp_path / "out"}'], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert result.stderr.strip() == f"parallel_gan.py: error: parallel_gan.py line {number}: lr must be a number, not 'fast'"
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('old, line, words', [
    ('n_pairs = 2  #', 'n_pairs = 2.5  #', 'n_pairs must be a whole number, not 2.5'),
    ('seed = 0  #', "seed = '0'  #", "seed must be a whole number, not '0'"),
    ('K = 100  #', 'K = True  #', 'K must be a whole number, not True'),
    ('resume = False  #', 'resume = 0  #', 'resume must be True or False, not 0'),
    ("device = 'auto'  #", 'device = 0  #', 'device must be a string, not 0'),
    ('beta1 = 0.9  #', "beta1 = '0.9'  #", "beta1 must be a number, not '0.9'"),
])
def test_every_kind_of_value_is_checked_in_the_block(tmp_path, capsys, old, line, words):
    edited, script = edited_copy(tmp_path, (old, line))
    number = next(i for i, text in enumerate(open(script).read().splitlines(), 1) if text.startswith(line))
    with pytest.raises(SystemExit) as exit:
        edited.parse_args([])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and f'line {number}: {words}' in err and len(err.strip().splitlines()) == 1


def test_a_number_written_as_an_integer_in_the_block_is_a_number(tmp_path):
    edited, _ = edited_copy(tmp_path, ('lr = 1e-3  #', 'lr = 1  #'))
    assert edited.parse_args([])['lr'] == 1.0 and type(edited.parse_args(['--lr=0.5'])['lr']) is float


def test_a_name_added_to_the_block_takes_its_defaults_kind_on_the_command_line_too(tmp_path):
    """A count stays a whole number (range(cfg['n']) works), a float a number, a bool a bool, a string a string."""
    edited, _ = edited_copy(tmp_path, ('K = 100  #', "n_critic = 5  # D steps per G step\nwarm = 0.5  # a fraction\n"
                                                     "ema = True  # an average of G\nnote = 'x'  # a note\nK = 100  #"))
    cfg = edited.parse_args([])
    assert [type(cfg[k]) for k in ('n_critic', 'warm', 'ema', 'note')] == [int, float, bool, str]
    cfg = edited.parse_args(['--n_critic=3', '--warm=1', '--ema=false', '--note=5'])
    assert (cfg['n_critic'], cfg['warm'], cfg['ema'], cfg['note']) == (3, 1.0, False, '5')
    assert type(cfg['n_critic']) is int and type(cfg['warm']) is float and list(range(cfg['n_critic'])) == [0, 1, 2]
    with pytest.raises(SystemExit):
        edited.parse_args(['--n_critic=2.5'])


def test_name_equals_value_without_spaces_is_a_hyperparameter_as_python_reads_it(tmp_path):
    edited, script = edited_copy(tmp_path, ('h_dim = 128  # hidden units of every generator and discriminator',
                                            'h_dim=64# hidden units'), ('z_dim = 10  #', 'z_dim  =  12  #'))
    cfg = edited.parse_args([])
    assert cfg['h_dim'] == 64 and cfg['z_dim'] == 12
    result = subprocess.run([sys.executable, script, '--help'], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and re.search(r'--h_dim\s+64\s+hidden units', result.stdout)


def test_a_name_and_its_value_apart_are_refused_saying_how_to_write_them(capsys):
    with pytest.raises(SystemExit):
        pg.parse_args(['--K', '5'])
    assert "unknown argument '--K' (write --K=VALUE, without a space)" in capsys.readouterr().err
