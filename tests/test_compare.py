"""The paper's tests made runnable: one pool of discriminators across runs (--compare), the discriminators'
train / held-out gap, train_size, and the pairing bookkeeping of the loop."""
import csv
import os

import pytest
import torch

import parallel_gan as pg
from conftest import load, train

TINY = ['--dataset=ring8', '--h_dim=16', '--iterations=30', '--log_every=10', '--sample_every=1000', '--eval_every=0']


@pytest.fixture(scope='module')
def two_runs(tmp_path_factory):
    """A folder with two tiny 2-pair runs that differ in K (and seed)."""
    folder = tmp_path_factory.mktemp('runs')
    train(*TINY, '--K=0', '--seed=0', f'--out_dir={folder / "a"}')
    train(*TINY, '--K=10', '--seed=1', f'--out_dir={folder / "nested" / "b"}')
    return folder


def compare(folder, *args):
    return pg.compare_runs(pg.parse_args([f'--compare={folder}', '--eval_samples=400', *args]))


def refused(capsys, folder):
    with pytest.raises(SystemExit) as stop:
        compare(folder)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1
    return err


def test_compare_pools_every_discriminator_and_matches_a_direct_computation(two_runs, capsys):
    assert compare(two_runs) == 0
    out = capsys.readouterr().out
    assert '| K=0 | 1 |' in out and '| K=10 | 1 |' in out  # grouped by what differs, the seed aside
    rows = open(two_runs / 'compare_matrix.csv').read().splitlines()
    header, matrix = rows[0].split(','), [row.split(',') for row in rows[1:]]
    assert header[1:] == ['a:G1', 'a:G2', 'nested/b:G1', 'nested/b:G2'] and len(matrix) == 4  # the pool: 4 judges

    z = torch.randn(400, 10, generator=torch.Generator().manual_seed(0))  # the compare mode's noise (seed 0)
    states = [load(two_runs / 'a' / 'checkpoint.pt'), load(two_runs / 'nested' / 'b' / 'checkpoint.pt')]
    Gs, Ds, names = [], [], []
    for run, state in zip(('a', 'nested/b'), states):
        pairs = pg.make_pairs(state['hyperparameters'], 2, torch.device('cpu'), torch.float32)
        G, D = pairs['G'], pairs['D']
        G.model.load_state_dict(state['pairs']['G']['model'])
        D.model.load_state_dict(state['pairs']['D']['model'])
        assert state['pairs']['G']['origin'] == [0, 1]  # GAP's swap moves discriminators only
        Gs += [pg.generate(pairs, z, None)[i] for i in range(2)]
        Ds += [(D, i) for i in range(2)]
        names += [f'{run}:D{state["pairs"]["D"]["origin"][i] + 1}' for i in range(2)]
    with torch.no_grad():
        for d, (D, slot) in enumerate(Ds):
            assert matrix[d][0] == names[d]
            for g, samples in enumerate(Gs):
                expected = (torch.sigmoid(D.model(samples)[slot]) > 0.5).double().mean().item()
                assert float(matrix[d][g + 1]) == pytest.approx(expected, abs=1e-3)

    table = {row.split(',')[0]: row.split(',') for row in open(two_runs / 'compare.csv').read().splitlines()}
    assert set(table) == {'configuration', 'K=0', 'K=10'}
    errors = torch.tensor([[float(v) for v in row[1:]] for row in matrix])
    columns = table['configuration']
    g_worst_others = float(table['K=0'][columns.index('g_worst_others')])
    assert g_worst_others == pytest.approx(errors[2:, :2].min(0).values.mean().item(), abs=1e-4)
    assert float(table['K=10'][columns.index('g_mean')]) == pytest.approx(errors[:, 2:].mean().item(), abs=1e-4)
    assert (two_runs / 'compare.png').stat().st_size > 1000


def test_compare_names_each_runs_best_generator_by_the_other_runs_discriminators(two_runs, capsys):
    """Algorithm 1's "select the best GAN": per run, the generator whose samples the other runs' discriminators
    take for real most often, with its own metrics (here 2-D: modes captured, high quality)."""
    assert compare(two_runs) == 0
    out = capsys.readouterr().out
    assert 'the best generator of each run' in out and '| K=10 | 1 |' in out.split('the best generator')[1]
    rows = [row.split(',') for row in open(two_runs / 'compare_matrix.csv').read().splitlines()]
    generators, matrix = rows[0][1:], torch.tensor([[float(v) for v in row[1:]] for row in rows[1:]])
    run_of = [name.split(':')[0] for name in generators]
    expected = {}
    for run in ('a', 'nested/b'):
        others = [d for d, r in enumerate(run_of) if r != run]
        mine = [g for g, r in enumerate(run_of) if r == run]
        best = max(mine, key=lambda g: matrix[others, g].mean().item())
        expected[run] = (generators[best], matrix[others, best].mean().item())
    best = list(csv.DictReader(open(two_runs / 'compare_best.csv')))
    assert [row['run'] for row in best] == [expected['a'][0], expected['nested/b'][0]]
    for row, (_, error) in zip(best, expected.values()):
        assert float(row['pool_error']) == pytest.approx(error, abs=1e-3)
        assert 0 <= float(row['modes_captured']) <= 8 and 0 <= float(row['high_quality']) <= 1


def test_compare_refuses_runs_of_other_shapes_an_empty_folder_and_skips_a_damaged_checkpoint(two_runs, tmp_path, capsys):
    assert 'no checkpoint.pt' in refused(capsys, tmp_path / 'empty')
    mixed = tmp_path / 'mixed'
    train(*TINY, '--K=0', '--h_dim=8', f'--out_dir={mixed / "narrow"}')
    train(*TINY, '--K=0', f'--out_dir={mixed / "wide"}')
    assert 'differ in h_dim (16 vs 8)' in refused(capsys, mixed)

    os.makedirs(two_runs / 'broken')
    (two_runs / 'broken' / 'checkpoint.pt').write_bytes(b'not a checkpoint')
    assert compare(two_runs) == 0
    captured = capsys.readouterr()
    assert 'skipping' in captured.err and 'broken' in captured.err and 'comparing 2 runs' in captured.out
    os.remove(two_runs / 'a' / 'checkpoint.pt'), os.remove(two_runs / 'nested' / 'b' / 'checkpoint.pt')
    assert 'none of its 1 checkpoint' in refused(capsys, two_runs)


def test_the_held_out_gap_shows_a_discriminator_that_memorised_its_training_set(tiny_mnist):
    """Slot 0 learns to tell the 20 training images (train_size=20) from the other training images: it takes
    them for real and the held-out test images for fake. Slot 1 says 0.7 to everything: no gap."""
    cfg = pg.parse_args([f'--data_root={tiny_mnist}', '--train_size=20', '--eval_samples=60', '--h_dim=64',
                         f'--classifier_dir={tiny_mnist}/cls'])
    images, labels = pg.training_data(cfg)
    torch.manual_seed(0)
    pairs = pg.make_pairs(cfg, 784, torch.device('cpu'), torch.float32)
    D = pairs['D']
    seen, others = pg.as_inputs(images[:20], torch.float32), pg.as_inputs(images[20:], torch.float32)
    for step in range(300):  # D's half of train_step: the seen images real, other training images fake
        fake = others[torch.randperm(len(others))[:20]].expand(2, -1, -1)
        D.optimizer.zero_grad()
        pg.d_loss(D.model(seen), D.model(fake)).sum().backward()
        D.optimizer.step()
    with torch.no_grad():
        D.model[2].weight[1].zero_()
        D.model[2].bias[1].fill_(torch.logit(torch.tensor(0.7)).item())
    D.origin = [1, 0]  # slot 0 holds the discriminator of pair 2
    rows = pg.Evaluator(cfg, torch.device('cpu'), torch.float32, images, labels)(pairs, 0)
    memoriser, constant = rows[1], rows[0]
    assert memoriser['d_train'] > 0.9 and memoriser['d_heldout'] < 0.3 and memoriser['d_gap'] > 0.6
    assert memoriser['d_train_acc'] > 0.9 and memoriser['d_acc_gap'] > 0.6
    assert constant['d_train'] == pytest.approx(0.7) and constant['d_heldout'] == pytest.approx(0.7)
    assert constant['d_gap'] == pytest.approx(0, abs=1e-6) and constant['d_train_acc'] == 1


def test_train_size_limits_the_data_the_batches_draw_from(tiny_mnist, tmp_path, capsys):
    train(f'--data_root={tiny_mnist}', '--train_size=40', '--h_dim=16', '--iterations=5', '--eval_every=0',
          f'--out_dir={tmp_path}')
    assert '40 mnist training points' in capsys.readouterr().out
    order = load(tmp_path / 'checkpoint.pt')['data']['order']
    assert sorted(order.tolist()) == list(range(40))
    with pytest.raises(SystemExit) as stop:
        train(f'--data_root={tiny_mnist}', '--train_size=301', '--iterations=5', f'--out_dir={tmp_path}/b')
    assert stop.value.code == 2 and 'has only 300 examples' in capsys.readouterr().err


def test_the_loop_knows_which_discriminator_each_generator_faces(monkeypatch, tmp_path):
    """4 pairs, where a random derangement is not its own inverse: each discriminator carries a mark (its output
    bias, 10 x its starting pair; a tiny lr leaves it in place), and after a run the checkpoint's D origin must
    name the mark found in each slot."""
    make_pairs = pg.make_pairs

    def marked(*args, **options):
        pairs = make_pairs(*args, **options)
        if pairs['D'].model.n_pairs == 4:  # the run's, not a torchrun process's share
            with torch.no_grad():
                pairs['D'].model[2].bias.copy_(10 * torch.arange(4.0).reshape(4, 1, 1))
        return pairs
    monkeypatch.setattr(pg, 'make_pairs', marked)
    train(*TINY, '--n_pairs=4', '--K=3', '--lr=1e-9', '--iterations=40', f'--out_dir={tmp_path}')
    state = load(tmp_path / 'checkpoint.pt')
    marks = (state['pairs']['D']['model']['2.bias'].flatten() / 10).round().long().tolist()
    assert sorted(marks) == [0, 1, 2, 3] and marks != [0, 1, 2, 3]
    assert marks == state['pairs']['D']['origin'] and state['pairs']['G']['origin'] == [0, 1, 2, 3]
    assert len({tuple(pg.new_partners(pg.parse_args(['--n_pairs=4']), it).tolist()) for it in range(3, 40, 3)}) > 1

