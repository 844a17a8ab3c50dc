"""PacGAN's packing (pack > 1): each discriminator judges `pack` samples side by side. Pinned to a plain loop over
the pairs with packing written out, bit for bit against the script without packing at pack=1, resumed exactly,
and scored in the evaluation and --compare by packs of one source."""
import math
import os

import pytest
import torch

import parallel_gan as pg
from conftest import edited_copy, load, run_script
from test_edits import TINY, whole_and_split
from test_gap import assert_matches_reference
from test_run import assert_same_run

F64, CPU = torch.float64, torch.device('cpu')


def test_pair_is_pack_k_is_the_concatenation_of_its_samples():
    cfg = pg.parse_args(['--n_pairs=2', '--pack=2', '--h_dim=8', '--mb_size=6'])
    torch.manual_seed(0)
    D = pg.make_pairs(cfg, 3, CPU, F64)['D'].model
    seen = []
    D[1].register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))  # the first Linear's input
    x = torch.randn(2, 6, 3, dtype=F64)
    assert D(x).shape == (2, 3, 1) and D[1].weight.shape == (2, 2 * 3, 8)
    for i in range(2):
        for k in range(3):
            assert torch.equal(seen[0][i, k], torch.cat([x[i, 2 * k], x[i, 2 * k + 1]]))


@pytest.mark.parametrize('options', [{}, {'paper': True, 'clip': 0.05, 'layers': 2}], ids=['script', 'paper'])
def test_packs_of_two_train_as_a_plain_loop_that_packs_each_pairs_batches(options):
    """Each pair's D judges its real batch and its own generator's samples in packs of two, through swaps: the same
    losses and weights as the reference loop with packing, under the script's conditions and the paper's (own
    noise and batches, input noise on each sample, clipping, batch norm over the packs)."""
    assert_matches_reference(4, iterations=60, K=10, h_dim=32, pack=2, **options)


def test_pack_1_is_the_script_without_packing_bit_for_bit(tmp_path):
    """The script with every line of packing taken out trains, evaluates and saves exactly what pack=1 does."""
    block_line = next(line for line in open(pg.__file__).read().splitlines() if line.startswith('pack = 1  #'))
    plain, _ = edited_copy(tmp_path, (block_line + '\n', ''), (
        "    h, layers = cfg['h_dim'], [Pack(cfg['pack'])] if cfg['pack'] > 1 else []\n"
        "    for fan_in in [x_dim * cfg['pack']] + [h] * (cfg['layers'] - 1):",
        "    h, layers = cfg['h_dim'], []\n"
        "    for fan_in in [x_dim] + [h] * (cfg['layers'] - 1):"), (
        "    D, batch = pairs['D'].model, x.shape[1]\n"
        "    pack = next((layer.m for layer in D.modules() if isinstance(layer, Pack)), 1)\n"
        "    if pack > 1:\n"
        "        filled = torch.arange(-(-batch // pack) * pack, device=x.device) % batch\n"
        "        x, y = x[:, filled], y[:, filled]\n"
        "    return D(x).repeat_interleave(pack, 1)[:, :batch]",
        "    return pairs['D'].model(x)"))
    assert 'pack' not in plain.parse_args([])
    args = [*TINY, '--n_pairs=2', '--K=5', '--iterations=30', '--eval_every=29', '--eval_samples=500']
    for module, out in ((pg, 'packing'), (plain, 'plain')):
        assert module.train(module.parse_args([*args, f'--out_dir={tmp_path / out}'])) == 0
    assert_same_run(load(tmp_path / 'packing' / 'checkpoint.pt'), load(tmp_path / 'plain' / 'checkpoint.pt'))
    assert (tmp_path / 'packing' / 'metrics.csv').read_text() == (tmp_path / 'plain' / 'metrics.csv').read_text()


def test_an_mb_size_that_packs_do_not_divide_is_refused_in_one_line():
    result = run_script('--pack=3', '--mb_size=32')
    assert result.returncode == 2 and result.stderr.count('\n') == 1 and 'Traceback' not in result.stderr
    assert 'mb_size=32 cannot be cut into packs of pack=3' in result.stderr


def test_a_packed_run_resumes_bit_for_bit(tmp_path):
    whole, split = whole_and_split(pg, tmp_path, '--pack=2', '--n_pairs=3', '--K=5', '--own_noise=True')
    assert_same_run(whole, split)
    assert whole['pairs']['D']['model']['1.weight'].shape == (3, 2 * 2, 16)  # ring8: packs of two 2-D points


def test_each_input_gets_the_logit_of_its_pack_the_last_filled_from_the_first():
    cfg = pg.parse_args(['--n_pairs=2', '--pack=3', '--h_dim=8', '--mb_size=30'])
    torch.manual_seed(0)
    pairs = pg.make_pairs(cfg, 2, CPU, F64)
    D, x = pairs['D'].model, torch.randn(1, 7, 2, dtype=F64)
    with torch.no_grad():
        scores = pg.score_inputs(pairs, x, torch.zeros(1, 7))
        assert scores.shape == (2, 7, 1)
        for members in ([0, 1, 2], [3, 4, 5], [6, 0, 1]):  # the last pack: input 6, filled up with 0 and 1
            assert torch.equal(scores[:, members[0]], D(x[:, members])[:, 0])
        assert torch.equal(scores[:, 0:3], scores[:, [0]].expand(-1, 3, -1))  # a pack's inputs share its logit


def test_compare_pools_packed_and_plain_discriminators(tmp_path, capsys):
    """A pool of a run whose D judges packs of two and one whose D judges single samples: every discriminator
    scores every generator, each as it judges."""
    for pack in (1, 2):
        assert pg.train(pg.parse_args([*TINY, '--n_pairs=2', '--K=5', '--iterations=12', f'--pack={pack}',
                                       f'--out_dir={tmp_path / "runs" / f"pack{pack}"}'])) == 0
    assert pg.main([f'--compare={tmp_path / "runs"}', '--eval_samples=300']) == 0
    rows = pg.read_csv(tmp_path / 'runs' / 'compare_generators.csv')
    assert len(rows) == 4 and all(math.isfinite(float(r['pool_error'])) for r in rows)
    assert 'pack=1' in capsys.readouterr().out and os.path.exists(tmp_path / 'runs' / 'compare_best.csv')
