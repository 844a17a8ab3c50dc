"""The command line: --name=value overrides, --help, and refusals before any work starts."""
import pytest

import parallel_gan as pg
from conftest import run_script


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
    for name, default, meaning in pg.hyperparameters():
        line = next(line for line in text.splitlines() if line.strip().startswith(f'--{name} '))
        assert repr(default) in line and meaning in line
    names = {name for name, _, _ in pg.hyperparameters()}
    assert {'mb_size', 'z_dim', 'h_dim', 'lr', 'K', 'iterations', 'log_every', 'sample_every', 'n_pairs',
            'seed', 'device', 'data_root', 'out_dir', 'resume'} <= names


@pytest.mark.parametrize('args, words', [
    (['--nope=1'], 'unknown argument'),
    (['K=3'], 'unknown argument'),
    (['--K'], 'unknown argument'),
    (['--K=ten'], 'expected an integer'),
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
