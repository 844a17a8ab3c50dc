"""The GAP maths: losses, gradients, one iteration against the plain reference loop, and the swap."""
import pytest
import torch
from torch import nn

import parallel_gan as pg
from conftest import edited_copy
from reference import ReferenceGAP

F64 = torch.float64
CPU = torch.device('cpu')
DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device'))]


def pairs(n_pairs=2, K=10, dtype=F64, seed=0, dev=CPU, **extra):
    cfg = pg.parse_args([f'--n_pairs={n_pairs}', f'--K={K}', *[f'--{k}={v}' for k, v in extra.items()]])
    torch.manual_seed(seed)
    pairs = pg.make_pairs(cfg, 784, torch.device(dev), dtype)
    if cfg['same_init']:  # as a run starts (the Recorder)
        pg.start_alike(pairs)
    return pairs['G'], pairs['D']


def test_losses_from_logits_equal_the_log_formulas():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(3, 32, 1, generator=g, dtype=F64) * 3, torch.randn(3, 32, 1, generator=g, dtype=F64) * 3
    D_real, D_fake = torch.sigmoid(real), torch.sigmoid(fake)
    expected_d = -(torch.log(D_real) + torch.log(1 - D_fake)).mean((1, 2))
    expected_g = -torch.log(D_fake).mean((1, 2))
    assert torch.allclose(pg.d_loss(real, fake), expected_d, rtol=0, atol=1e-12)
    assert torch.allclose(pg.g_loss(fake), expected_g, rtol=0, atol=1e-12)


def test_losses_stay_finite_where_the_log_of_a_probability_would_not():
    huge = torch.full((1, 4, 1), 200.0)
    assert torch.isfinite(pg.d_loss(huge, -huge)).all() and torch.isfinite(pg.g_loss(-huge)).all()
    assert pg.g_loss(-huge).item() == pytest.approx(200.0)


def test_pair_slices_are_the_nn_linear_networks_of_the_reference():
    G, D = pairs(n_pairs=3)
    ref = ReferenceGAP(3, 10, 128, 784, 1e-3).to(F64).copy_weights_from(G.model, D.model)
    z, x = torch.randn(5, 10, dtype=F64), torch.rand(5, 784, dtype=F64)
    fake = pg.generate({'G': G}, z, None)
    for i in range(3):
        assert torch.allclose(fake[i], ref.G[i](z), atol=1e-14)
        assert torch.allclose(D.model(x)[i], ref.D[i](x), atol=1e-14)


def test_every_network_is_initialised_like_nn_linear():
    G, D = pairs(n_pairs=4, dtype=torch.float32)
    for first, n_in in ((G.model[0].weight, 10), (D.model[0].weight, 784)):
        bound = 1 / n_in ** 0.5
        assert first.abs().max() <= bound and first.abs().max() > 0.95 * bound
        assert not torch.equal(first[0], first[1])  # pairs start apart


def assert_matches_reference(n_pairs=2, dev=CPU, module=pg, iterations=150, K=10, losses=None, edit_reference=None,
                             train_step_args=(), **options):
    """Same starting weights, same noise and batches: the same D and G losses as the reference loop, within 1e-9,
    in float64, through a swap wherever swaps_at says; at the end the same weights (and running statistics).
    options: hyperparameters (the paper's conditions among them); train_step_args: an edited train_step's own
    arguments after clip. Returns the last iteration's losses."""
    cfg = module.parse_args([f'--n_pairs={n_pairs}', f'--K={K}', *[f'--{k}={v}' for k, v in options.items()]])
    torch.manual_seed(0)
    pairs = module.make_pairs(cfg, 784, torch.device(dev), F64)
    G, D = pairs['G'], pairs['D']
    ref = ReferenceGAP(n_pairs, cfg['z_dim'], cfg['h_dim'], 784, cfg['lr'], cfg['layers'], cfg['beta1'],
                       *([losses] if losses else []), batch_norm=cfg['batch_norm'], output=module.IMAGE_OUTPUT,
                       clip=cfg['clip'], pack=cfg['pack'])
    if edit_reference:
        edit_reference(ref)
    ref.to(F64).to(dev).copy_weights_from(G.model, D.model)
    g = torch.Generator().manual_seed(3)
    data = module.make_batches(torch.randint(0, 256, (500, 784), dtype=torch.uint8, generator=g), torch.zeros(500), cfg, 4,
                               F64)
    swaps = 0
    for it in range(iterations):
        z = module.draw_noise(cfg, cfg['mb_size'], g, F64).to(dev)
        x, y = (t.to(dev).expand(n_pairs, *t.shape[1:]) for t in data.next())  # as gap_iteration gives them
        noise = tuple(e if e is None else e.to(dev) for e in module.input_noise_of(cfg, it, 784, g, F64))
        stats = module.train_step(G, D, z, x, y, noise, cfg['clip'], *train_step_args)
        ours = torch.stack([stats['D_loss'], stats['G_loss']], 1)
        theirs = ref.iteration(z if len(z) > 1 else z[0], x if len(x) > 1 else x[0], noise)
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-9), f'iteration {it}'
        if module.swaps_at(it, cfg):
            partners = module.new_partners(cfg, it)
            module.swap_discriminators(D, partners)
            ref.swap(partners.tolist())
            swaps += 1
    assert swaps == (iterations - 1) // K
    assert ours[:, 0].std() > 0  # the pairs really differ
    for side, nets in ((G, ref.G), (D, ref.D)):
        fresh = type(ref)(n_pairs, cfg['z_dim'], cfg['h_dim'], 784, 1e-3, cfg['layers'], batch_norm=cfg['batch_norm'],
                          output=module.IMAGE_OUTPUT, pack=cfg['pack'])
        if edit_reference:
            edit_reference(fresh)
        fresh.to(F64).to(dev).copy_weights_from(G.model, D.model)
        mine = fresh.G if side is G else fresh.D
        for a, b in zip(mine, nets):
            for (name, t), u in zip(a.state_dict().items(), b.state_dict().values()):
                if t.is_floating_point():
                    assert torch.allclose(t, u, rtol=0, atol=1e-8), name
    return ours


@pytest.mark.parametrize('dev', DEVICES)
@pytest.mark.parametrize('n_pairs', [2, 4])
def test_150_iterations_with_a_dozen_swaps_equal_the_reference_loop(n_pairs, dev):
    assert_matches_reference(n_pairs, dev)


def test_three_hidden_layers_and_beta1_equal_the_reference_loop():
    assert_matches_reference(4, layers=3, beta1=0.5, iterations=130)


@pytest.mark.parametrize('options', [
    {'own_noise': True}, {'prior': 'uniform'}, {'prior': 'mixed'}, {'input_noise': 0.3}, {'clip': 0.05},
    {'swap': 'matching'}, {'swap': 'matching', 'n_pairs': 3}, {'batch_norm': True, 'layers': 2},
    {'paper': True, 'clip': 0.05, 'layers': 2}], ids=lambda options: ','.join(f'{k}={v}' for k, v in options.items()))
def test_each_of_the_papers_conditions_equals_the_reference_loop(options):
    """Each condition alone, and all together (paper=True; its clip made small enough to act), through a dozen swaps."""
    options = {'n_pairs': 4, 'h_dim': 32, **options}
    assert_matches_reference(iterations=130, **options)


def test_paper_sets_its_conditions_and_clipping_acts_on_each_network():
    cfg = pg.parse_args(['--paper=True'])
    assert {k: cfg[k] for k in pg.PAPER} == pg.PAPER
    assert pg.parse_args(['--paper=True', '--clip=3', '--batch_norm=False'])['clip'] == 3.0  # the command line wins
    G, D = pairs(n_pairs=3)
    for p in D.model.parameters():
        p.grad = torch.randn_like(p)
    norms = lambda: torch.stack([p.grad.flatten(1).square().sum(1) for p in D.model.parameters()]).sum(0).sqrt()
    before = norms()
    pg.clip_gradients(D.model, 10.0)
    assert torch.allclose(norms(), before.clamp(max=10.0), rtol=1e-6) and before.max() > 10


def test_an_edited_loss_drives_training_and_matches_its_reference(tmp_path):
    """Least-squares losses on the logits, edited into a copy of the script, train (through autograd) exactly
    as the reference loop with the same losses, and not as the shipped losses do."""
    def lsq_d(real, fake):
        return 0.5 * ((real - 1) ** 2).mean() + 0.5 * (fake ** 2).mean()

    def lsq_g(fake):
        return 0.5 * ((fake - 1) ** 2).mean()
    edited, _ = edited_copy(tmp_path, (
        'return F.softplus(-real_logit).mean((1, 2)) + F.softplus(fake_logit).mean((1, 2))',
        'return 0.5 * ((real_logit - 1) ** 2).mean((1, 2)) + 0.5 * (fake_logit ** 2).mean((1, 2))'), (
        'return F.softplus(-fake_logit).mean((1, 2))', 'return 0.5 * ((fake_logit - 1) ** 2).mean((1, 2))'))
    least_squares = assert_matches_reference(2, module=edited, iterations=130, losses=(lsq_d, lsq_g))
    shipped = assert_matches_reference(2, iterations=130)
    assert not torch.allclose(least_squares, shipped, atol=1e-3)


def test_train_step_reports_the_losses_and_d_of_real_and_fake_before_the_d_step():
    G, D = pairs()
    z, x = torch.randn(32, 10, dtype=F64), torch.rand(32, 784, dtype=F64)
    fake = pg.generate({'G': G}, z, None)
    logit = D.model(torch.cat([x.expand(2, -1, -1), fake], 1)).clone()
    stats = pg.train_step(G, D, z, x)
    assert list(stats) == ['D_loss', 'G_loss', 'D(x)', 'D(G(z))'] and all(v.shape == (2,) for v in stats.values())
    assert torch.allclose(stats['D_loss'], pg.d_loss(logit[:, :32], logit[:, 32:]))
    assert torch.allclose(stats['G_loss'], pg.g_loss(D.model(fake)))  # scored by the updated D
    assert torch.allclose(stats['D(x)'], torch.sigmoid(logit[:, :32]).mean((1, 2)))
    assert torch.allclose(stats['D(G(z))'], torch.sigmoid(logit[:, 32:]).mean((1, 2)))


def test_after_a_swap_each_generator_trains_against_the_other_discriminator_and_its_adam_state():
    G, D = pairs()
    z, x = torch.randn(32, 10, dtype=F64), torch.rand(32, 784, dtype=F64)
    for _ in range(3):
        pg.train_step(G, D, z, x)
    before = {name: p.clone() for name, p in D.model.named_parameters()}
    moments = {name: {k: D.optimizer.state[p][k].clone() for k in ('exp_avg', 'exp_avg_sq')}
               for name, p in D.model.named_parameters()}
    pg.swap_discriminators(D, pg.new_partners(pg.parse_args([]), 100))
    for name, p in D.model.named_parameters():
        assert torch.equal(p[0], before[name][1]) and torch.equal(p[1], before[name][0])
        for k in ('exp_avg', 'exp_avg_sq'):
            state = D.optimizer.state[p][k]
            assert torch.equal(state[0], moments[name][k][1]) and torch.equal(state[1], moments[name][k][0])
            assert not torch.equal(state[0], state[1])

    # generator 0 now faces the discriminator that pair 1 trained: its G step is scored by that D
    fake = pg.generate({'G': G}, z, None)
    W1, b1, W2, b2 = (before[k][1] for k in ('0.weight', '0.bias', '2.weight', '2.bias'))
    expected = nn.functional.softplus(-(torch.relu(fake[0] @ W1 + b1) @ W2 + b2)).mean()
    assert torch.allclose(pg.g_loss(D.model(fake))[0], expected)



def test_swap_moves_weights_moves_the_weights_and_leaves_each_slot_its_adam_state():
    """The authors' exchange: a discriminator arrives at its new partner without its Adam moments; the slot keeps
    the moments of the discriminator that trained there before (slot 0's exp_avg before and after a swap)."""
    G, D = pairs()
    z, x = torch.randn(32, 10, dtype=F64), torch.rand(32, 784, dtype=F64)
    for _ in range(3):
        pg.train_step(G, D, z, x)
    first = D.model[0].weight
    weight, exp_avg = first.detach().clone(), D.optimizer.state[first]['exp_avg'].clone()
    pg.swap_discriminators(D, torch.tensor([1, 0]), moves='weights')
    assert torch.equal(first[0], weight[1]) and torch.equal(first[1], weight[0])  # the weights moved
    assert torch.equal(D.optimizer.state[first]['exp_avg'], exp_avg)  # slot 0 kept its own moments
    assert not torch.equal(exp_avg[0], exp_avg[1]) and D.origin == [1, 0]
    pg.swap_discriminators(D, torch.tensor([1, 0]))  # 'network' (the default): the moments travel too
    assert torch.equal(first, weight) and torch.equal(D.optimizer.state[first]['exp_avg'], exp_avg[[1, 0]])


def test_same_init_starts_every_pair_from_pair_1s_weights_and_draws_as_the_default():
    """same_init: every slice of every weight (G and D) is pair 1's, which is the default run's pair 1: the option
    draws nothing of its own, so the rest of the run's randomness is as without it."""
    G, D = pairs(n_pairs=3, own_noise=True, same_init=True, batch_norm=True, layers=2)
    plain_G, plain_D = pairs(n_pairs=3, own_noise=True, batch_norm=True, layers=2)
    for side, plain in ((G, plain_G), (D, plain_D)):
        for t, u in zip(side.weights(), plain.weights()):
            assert all(torch.equal(t[i], u[0]) for i in range(3))
    assert not torch.equal(plain_D.model[0].weight[0], plain_D.model[0].weight[1])

def test_batch_norm_normalises_each_pairs_batch_in_training_and_evaluation_alike():
    G, D = pairs(n_pairs=3, batch_norm=True)
    x = torch.rand(3, 40, 784, dtype=F64)
    hidden = D.model[1](D.model[0](x))  # Linear, then BatchNorm
    assert torch.allclose(hidden.mean(1), torch.zeros(3, 128, dtype=F64), atol=1e-12)
    assert torch.allclose(hidden.var(1, unbiased=False), torch.ones(3, 128, dtype=F64), atol=1e-3)
    with pg.evaluating(D):
        assert torch.equal(D.model(x), D.model.train(False)(x))
    assert not torch.allclose(D.model(x)[:, :20], D.model(x[:, :20]))  # a batch's statistics are its own
    assert list(D.model.buffers()) == []


def test_with_k_zero_the_script_never_swaps(monkeypatch, tiny_mnist, tmp_path):
    calls = []
    monkeypatch.setattr(pg, 'swap_discriminators', lambda *a: calls.append(a))
    cfg = pg.parse_args(['--K=0', '--iterations=30', f'--data_root={tiny_mnist}', f'--out_dir={tmp_path}',
                         '--sample_every=1000', '--eval_every=0'])
    assert pg.train(cfg) == 0
    assert calls == []
    cfg = pg.parse_args(['--K=10', '--iterations=31', f'--data_root={tiny_mnist}', f'--out_dir={tmp_path / "K10"}',
                         '--sample_every=1000', '--eval_every=0'])
    pg.train(cfg)
    assert len(calls) == 3  # after iterations 10, 20 and 30


def test_with_four_pairs_no_discriminator_keeps_its_partner():
    cfg = pg.parse_args(['--n_pairs=4'])
    for it in range(100, 5100, 100):
        partners = pg.new_partners(cfg, it)
        assert sorted(partners.tolist()) == [0, 1, 2, 3]
        assert all(partners[i] != i for i in range(4))
    draws = {tuple(pg.new_partners(cfg, it).tolist()) for it in range(100, 20100, 100)}
    assert len(draws) == 9  # every derangement of four turns up: the pairing is random
    assert pg.new_partners(cfg, 300).tolist() == pg.new_partners(cfg, 300).tolist()  # and seeded
    assert pg.new_partners(pg.parse_args([]), 300).tolist() == [1, 0]


@pytest.mark.parametrize('n_pairs', [4, 5])
def test_the_matching_swap_exchanges_discriminators_in_random_disjoint_pairs(n_pairs):
    """Algorithm 1: n_pairs/2 pairs (i, j) drawn without replacement exchange their discriminators; with an odd
    number of pairs exactly one keeps its own."""
    cfg = pg.parse_args([f'--n_pairs={n_pairs}', '--swap=matching'])
    draws = set()
    for it in range(100, 20100, 100):
        partners = pg.new_partners(cfg, it)
        assert torch.equal(partners[partners], torch.arange(n_pairs))  # an exchange: i gets j's and j gets i's
        assert int((partners == torch.arange(n_pairs)).sum()) == n_pairs % 2
        draws.add(tuple(partners.tolist()))
    assert len(draws) == (3 if n_pairs == 4 else 15)  # every perfect matching turns up


def test_batches_use_every_image_once_per_epoch():
    data = torch.arange(100, dtype=torch.uint8)[:, None]
    batches = pg.Batches(data, data[:, 0], 32, 0, F64)  # each example labelled with its index
    seen = torch.cat([batches.next()[1] for _ in range(25)], 1).flatten()  # 800 images: 8 epochs exactly
    for epoch in seen.reshape(8, 100):
        assert sorted(epoch.tolist()) == list(range(100))
    assert not torch.equal(seen[:100], seen[100:200])  # a fresh shuffle each epoch


def test_each_pair_its_own_order_every_example_once_per_epoch_and_its_own_noise():
    cfg = pg.parse_args(['--n_pairs=3', '--own_noise=True', '--mb_size=20'])
    data = torch.arange(100, dtype=torch.uint8)[:, None]
    batches = pg.make_batches(data, data[:, 0], cfg, 1, F64)  # each example labelled with its index
    seen = torch.cat([batches.next()[1] for _ in range(10)], 1)  # (3 pairs, 200): two epochs each
    for pair in seen:
        for epoch in pair.reshape(2, 100):
            assert sorted(epoch.tolist()) == list(range(100))
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    z = pg.draw_noise(cfg, 20, torch.Generator().manual_seed(0), F64)
    assert z.shape == (3, 20, 10) and not torch.equal(z[0], z[1])
    assert pg.draw_noise(pg.parse_args([]), 20, torch.Generator(), F64).shape == (1, 20, 10)  # shared


def test_the_priors_gaussian_uniform_and_mixed():
    for own in (False, True):
        cfg = pg.parse_args(['--n_pairs=4', '--prior=mixed', f'--own_noise={own}', '--z_dim=200'])
        z = pg.draw_noise(cfg, 500, torch.Generator().manual_seed(0), F64)
        assert z.shape == (4, 500, 200)
        assert z[:2].abs().max() > 2.5 and z[2:].abs().max() <= 1  # the first half Gaussian, the rest uniform
        assert z[2:].std().item() == pytest.approx(1 / 3 ** 0.5, abs=0.01)
        assert torch.equal(z[0], z[1]) != own


def test_batches_resume_where_they_stopped():
    data = torch.arange(100, dtype=torch.uint8)[:, None]
    a = pg.Batches(data, data[:, 0], 32, 0, F64)
    for _ in range(5):
        a.next()
    b = pg.Batches(data, data[:, 0], 32, 9, F64)
    b.load_state_dict(a.state_dict())
    for _ in range(10):
        (x, y), (x_again, y_again) = a.next(), b.next()
        assert torch.equal(x, x_again) and torch.equal(y, y_again)


def test_input_noise_decays_linearly_to_zero_at_the_last_iteration():
    """std input_noise at iteration 0, half of it half-way, 0 at the last, each draw standard normal times std."""
    cfg = pg.parse_args(['--input_noise=0.3', '--iterations=101', '--n_pairs=3', '--mb_size=64'])
    for it, std in ((0, 0.3), (50, 0.15), (100, 0.0)):
        drawn = pg.input_noise_of(cfg, it, 5, torch.Generator().manual_seed(it), torch.float64)
        g = torch.Generator().manual_seed(it)
        expected = [std * torch.randn(3, 64, 5, generator=g, dtype=torch.float64) for _ in range(3)]
        assert len(drawn) == 3 and all(torch.allclose(d, e, rtol=0, atol=1e-15) for d, e in zip(drawn, expected))
    assert pg.input_noise_of(pg.parse_args([]), 0, 5, torch.Generator(), torch.float64) == (None, None, None)


def test_clipping_leaves_a_gradient_shorter_than_clip_untouched_and_shortens_a_longer_one_to_clip():
    """Pair 0's gradient (norm 0.5) passes unchanged, bit for bit; pair 1's (norm 4) is scaled to norm 1."""
    G, D = pairs(n_pairs=2)
    grads = [torch.randn_like(p) for p in D.model.parameters()]
    norms = torch.stack([g.flatten(1).square().sum(1) for g in grads]).sum(0).sqrt()
    for p, g in zip(D.model.parameters(), grads):
        p.grad = g * (torch.tensor([0.5, 4.0], dtype=F64) / norms).view(-1, *[1] * (g.dim() - 1))
    before = [p.grad.clone() for p in D.model.parameters()]
    pg.clip_gradients(D.model, 1.0)
    assert all(torch.equal(p.grad[0], b[0]) for p, b in zip(D.model.parameters(), before))
    after = torch.stack([p.grad[1].square().sum() for p in D.model.parameters()]).sum().sqrt()
    assert after == pytest.approx(1.0, abs=1e-5)
