"""The GAP maths: losses, gradients, one iteration against the plain reference loop, and the swap."""
import os
import subprocess
import sys

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
    return pg.make_pairs(cfg, 784, torch.device(dev), dtype)


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


def test_the_written_out_backward_matches_autograd():
    torch.manual_seed(1)
    stack = pg.Stack(3, 20, 16, 5).double()
    x = torch.randn(3, 8, 20, dtype=F64)
    grad_output = torch.randn(3, 8, 5, dtype=F64)
    for p in stack.parameters():
        p.grad = torch.zeros_like(p)
    output, hidden = stack(x)
    grad_x = stack.backward(x, hidden, grad_output, inputs=True)

    params = [p.detach().clone().requires_grad_() for p in stack.parameters()]
    W1, b1, W2, b2 = params
    x_ = x.clone().requires_grad_()
    expected = torch.baddbmm(b2, torch.baddbmm(b1, x_, W1).relu(), W2)
    assert torch.allclose(output, expected)
    grads = torch.autograd.grad(expected, [*params, x_], grad_output)
    for p, g in zip(stack.parameters(), grads):
        assert torch.allclose(p.grad, g, atol=1e-12)
    assert torch.allclose(grad_x, grads[-1], atol=1e-12)


def test_stack_slices_are_the_nn_linear_networks_of_the_reference():
    G, D = pairs(n_pairs=3)
    ref = ReferenceGAP(3, 10, 128, 784, 1e-3).to(F64).copy_weights_from(G['model'], D['model'])
    z, x = torch.randn(5, 10, dtype=F64), torch.rand(5, 784, dtype=F64)
    fake, _ = pg.generate(G, z)
    for i in range(3):
        assert torch.allclose(fake[i], ref.G[i](z), atol=1e-14)
        assert torch.allclose(D['model'](x)[0][i], ref.D[i](x), atol=1e-14)


def test_every_network_is_initialised_like_nn_linear():
    G, D = pairs(n_pairs=4, dtype=torch.float32)
    for stack, n_in in ((G['model'], 10), (D['model'], 784)):
        bound = 1 / n_in ** 0.5
        assert stack.W1.abs().max() <= bound and stack.W1.abs().max() > 0.95 * bound
        assert not torch.equal(stack.W1[0], stack.W1[1])  # pairs start apart


def assert_matches_reference(n_pairs, dev=CPU, module=pg, iterations=150, K=10, layers=1, beta1=0.9, losses=None):
    """Same starting weights, same noise and batches: the same D and G losses as the reference loop, within 1e-9,
    in float64, through a swap every K iterations. Returns the last iteration's losses."""
    cfg = module.parse_args([f'--n_pairs={n_pairs}', f'--K={K}', f'--layers={layers}', f'--beta1={beta1}'])
    torch.manual_seed(0)
    G, D = module.make_pairs(cfg, 784, torch.device(dev), F64)
    ref = ReferenceGAP(n_pairs, 10, 128, 784, 1e-3, layers, beta1, *([losses] if losses else []))
    ref.to(F64).to(dev).copy_weights_from(G['model'], D['model'])
    g = torch.Generator().manual_seed(3)
    data = module.Batches(torch.randint(0, 256, (500, 784), dtype=torch.uint8, generator=g), 32, 4)
    swaps = 0
    for it in range(iterations):
        z = torch.randn(32, 10, generator=g, dtype=F64).to(dev)
        x = module.as_inputs(data.next(), F64).to(dev)
        ours = module.train_step(G, D, z, x)[:, :2]
        theirs = ref.iteration(z, x)
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-9), f'iteration {it}'
        if it != 0 and it % K == 0:
            partners = module.new_partners(n_pairs, 0, it)
            module.swap_discriminators(D, partners)
            ref.swap(partners.tolist())
            swaps += 1
    assert swaps == (iterations - 1) // K
    assert ours[:, 0].std() > 0  # the pairs really differ
    return ours


@pytest.mark.parametrize('dev', DEVICES)
@pytest.mark.parametrize('n_pairs', [2, 4])
def test_150_iterations_with_a_dozen_swaps_equal_the_reference_loop(n_pairs, dev):
    pg.check_losses()  # the shipped losses' closed-form gradients, as a run uses them
    assert pg.verified_closed_forms.keys() == {pg.d_loss, pg.g_loss}
    assert_matches_reference(n_pairs, dev)
    pg.verified_closed_forms.clear()  # and through autograd
    assert_matches_reference(n_pairs, dev, iterations=40)


def test_three_hidden_layers_and_beta1_equal_the_reference_loop():
    assert_matches_reference(4, layers=3, beta1=0.5, iterations=130)


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
    edited.check_losses()
    assert edited.verified_closed_forms == {}  # the written-out gradients no longer apply: autograd it is
    least_squares = assert_matches_reference(2, module=edited, iterations=130, losses=(lsq_d, lsq_g))
    shipped = assert_matches_reference(2, iterations=130)
    assert not torch.allclose(least_squares, shipped, atol=1e-3)


def test_train_step_reports_the_losses_and_d_of_real_and_fake_before_the_d_step():
    G, D = pairs()
    z, x = torch.randn(32, 10, dtype=F64), torch.rand(32, 784, dtype=F64)
    fake, _ = pg.generate(G, z)
    logit = D['model'](torch.cat([x.expand(2, -1, -1), fake], 1))[0].clone()
    stats = pg.train_step(G, D, z, x)
    assert stats.shape == (2, 4)
    assert torch.allclose(stats[:, 0], pg.d_loss(logit[:, :32], logit[:, 32:]))
    assert torch.allclose(stats[:, 1], pg.g_loss(D['model'](fake)[0]))  # scored by the updated D
    assert torch.allclose(stats[:, 2], torch.sigmoid(logit[:, :32]).mean((1, 2)))
    assert torch.allclose(stats[:, 3], torch.sigmoid(logit[:, 32:]).mean((1, 2)))


def test_after_a_swap_each_generator_trains_against_the_other_discriminator_and_its_adam_state():
    G, D = pairs()
    z, x = torch.randn(32, 10, dtype=F64), torch.rand(32, 784, dtype=F64)
    for _ in range(3):
        pg.train_step(G, D, z, x)
    before = {name: p.clone() for name, p in D['model'].named_parameters()}
    moments = {name: {k: D['solver'].state[p][k].clone() for k in ('exp_avg', 'exp_avg_sq')}
               for name, p in D['model'].named_parameters()}
    pg.swap_discriminators(D, pg.new_partners(2, 0, 100))
    for name, p in D['model'].named_parameters():
        assert torch.equal(p[0], before[name][1]) and torch.equal(p[1], before[name][0])
        for k in ('exp_avg', 'exp_avg_sq'):
            state = D['solver'].state[p][k]
            assert torch.equal(state[0], moments[name][k][1]) and torch.equal(state[1], moments[name][k][0])
            assert not torch.equal(state[0], state[1])

    # generator 0 now faces the discriminator that pair 1 trained: its G step is scored by that D
    fake, _ = pg.generate(G, z)
    W1, b1, W2, b2 = (before[k][1] for k in ('W1', 'b1', 'W2', 'b2'))
    expected = nn.functional.softplus(-(torch.relu(fake[0] @ W1 + b1) @ W2 + b2)).mean()
    assert torch.allclose(pg.g_loss(D['model'](fake)[0])[0], expected)


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
    for it in range(100, 5100, 100):
        partners = pg.new_partners(4, 0, it)
        assert sorted(partners.tolist()) == [0, 1, 2, 3]
        assert all(partners[i] != i for i in range(4))
    draws = {tuple(pg.new_partners(4, 0, it).tolist()) for it in range(100, 20100, 100)}
    assert len(draws) == 9  # every derangement of four turns up: the pairing is random
    assert pg.new_partners(4, 0, 300).tolist() == pg.new_partners(4, 0, 300).tolist()  # and seeded
    assert pg.new_partners(2, 0, 300).tolist() == [1, 0]


def test_batches_use_every_image_once_per_epoch():
    data = torch.arange(100, dtype=torch.uint8)[:, None]
    batches = pg.Batches(data, 32, 0)
    seen = torch.cat([batches.next() for _ in range(25)]).flatten()  # 800 images: 8 epochs exactly
    for epoch in seen.reshape(8, 100):
        assert sorted(epoch.tolist()) == list(range(100))
    assert not torch.equal(seen[:100], seen[100:200])  # a fresh shuffle each epoch


def test_batches_resume_where_they_stopped():
    data = torch.arange(100, dtype=torch.uint8)[:, None]
    a = pg.Batches(data, 32, 0)
    for _ in range(5):
        a.next()
    b = pg.Batches(data, 32, 9)
    b.load_state_dict(a.state_dict())
    for _ in range(10):
        assert torch.equal(a.next(), b.next())


@pytest.mark.parametrize('edit, names', [
    (('return pre.relu_()', 'return torch.nn.functional.leaky_relu(pre, 0.2)'), 'G.W1, G.b1, G.W2, G.b2, D.W1, D.b1'),
    (("(out.sigmoid_() if G['output'] == 'sigmoid' else out)", "(out.tanh() if G['output'] == 'sigmoid' else out)"),
     'G.W1, G.b1, G.W2, G.b2'),
])
def test_a_forward_edited_without_its_backward_is_caught_at_start_up(tmp_path, tiny_mnist, edit, names):
    """A copy of the script with another activation (or generator output) but the old written-out backward
    stops before training, naming the weights whose gradients no longer match."""
    _, script = edited_copy(tmp_path, edit)
    result = subprocess.run([sys.executable, script, f'--data_root={tiny_mnist}', f'--out_dir={tmp_path / "out"}',
                             '--iterations=5', '--eval_every=0'], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert 'the written-out backward no longer matches the forward maths' in result.stderr
    assert f'the gradients of {names} differ' in result.stderr
    assert not os.path.exists(tmp_path / 'out' / 'checkpoint.pt')


def test_the_start_up_check_passes_the_shipped_networks_at_every_depth():
    for args in ([], ['--layers=3'], ['--dataset=ring8', '--layers=4']):
        pg.check_backward(pg.parse_args(args))  # returns without stopping


def test_the_graphed_loop_schedule_repeats_the_eager_loop(monkeypatch, tmp_path):
    """The CUDA-graph path's bookkeeping, on the CPU: blocks of 64/16/4/1 quiet iterations that read the batch
    through a device cursor into a copy of the epoch's order, the rest eager. Here a "graph" re-runs the
    captured Python code at each replay; on a GPU, tests/test_cuda.py checks the real graphs the same way."""
    from types import SimpleNamespace
    from conftest import make_mnist
    root = make_mnist(tmp_path / 'data', train=4000, test=50)  # 125 batches an epoch
    common = [f'--data_root={root}', '--iterations=450', '--log_every=200', '--sample_every=300', '--K=70',
              '--n_pairs=3', '--h_dim=16', '--eval_every=0', '--dtype=float64']
    pg.train(pg.parse_args([*common, f'--out_dir={tmp_path / "eager"}']))
    replays = []
    monkeypatch.setattr(pg, 'use_cuda_graphs', lambda dev, cfg: True)
    monkeypatch.setattr(pg.GraphedIterations, 'capture', lambda self, length: SimpleNamespace(
        replay=lambda: replays.append(length) or self.iterations(length)))
    pg.train(pg.parse_args([*common, f'--out_dir={tmp_path / "graphed"}']))
    assert {64, 16, 4, 1} <= set(replays) and sum(replays) > 350
    eager, graphed = (torch.load(tmp_path / run / 'checkpoint.pt', weights_only=True) for run in ('eager', 'graphed'))
    assert torch.equal(eager['history'], graphed['history']) and eager['pairing'] == graphed['pairing']
    for side in ('G', 'D'):
        for name, value in eager[side]['model'].items():
            assert torch.equal(value, graphed[side]['model'][name])
