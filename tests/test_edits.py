"""Researchers' edits of the networks, each made in a copy of the script as the README's "Editing the script" says,
and each checked to train the right gradients: against autograd on the real networks, or against the reference
loop with the same edit."""
import pytest
import torch
from torch import nn

import parallel_gan as pg
from conftest import edited_copy
from test_gap import assert_matches_reference

F64, CPU = torch.float64, torch.device('cpu')

D_HIDDEN = ("""        layers.append(nn.ReLU(inplace=True))
    return Networks(*layers, Linear(n, h, 1))""")
D_LINEAR = """    for fan_in in [x_dim] + [h] * (cfg['layers'] - 1):
        layers.append(Linear(n, fan_in, h))"""
EDITS = {  # the README's recipes: (old, new) in parallel_gan.py
    'leaky_relu_in_D': (D_HIDDEN, D_HIDDEN.replace('nn.ReLU(inplace=True)', 'nn.LeakyReLU(0.2, inplace=True)')),
    'layer_norm_in_D': (D_LINEAR, D_LINEAR + "\n        layers.append(nn.LayerNorm(h, elementwise_affine=False))"),
    'dropout_in_D': (D_HIDDEN, D_HIDDEN.replace('(inplace=True))', '(inplace=True))\n        layers.append(nn.Dropout(0.3))')),
    'second_G_layer_of_256': ('return Networks(*layers, Linear(n, h, x_dim), *output)',
                              'return Networks(*layers, Linear(n, h, 256), nn.ReLU(inplace=True), Linear(n, 256, x_dim), *output)'),
    'tanh_output': ('IMAGE_OUTPUT, PIXELS = nn.Sigmoid, (0.0, 1.0)', 'IMAGE_OUTPUT, PIXELS = nn.Tanh, (-1.0, 1.0)'),
    'conv_D': ("""    return Networks(*layers, Linear(n, h, 1))""", """    return Networks(PerPair(n, lambda: nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 8, 4, 2, 1), nn.LeakyReLU(0.2),
        nn.Conv2d(8, 16, 4, 2, 1), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(16 * 7 * 7, 1))))"""),
}


def edited(tmp_path, name):
    return edited_copy(tmp_path, EDITS[name])[0]


def losses(module, cfg, iterations, written_out):
    """Each iteration's losses of module's train_step on cfg's networks, trained by the written-out backward where
    written_out confirms it (else autograd), with fixed weights, data and random draws."""
    module.check_losses()
    module.written_out_confirmed.clear()
    module.written_out_confirmed.update(written_out)
    torch.manual_seed(0)
    G, D = module.make_pairs(cfg, 784, CPU, F64)
    g = torch.Generator().manual_seed(1)
    rows = []
    for it in range(iterations):
        z, x = torch.randn(32, 10, generator=g, dtype=F64), module.as_inputs(torch.randint(0, 256, (32, 784), generator=g).to(torch.uint8), F64)
        torch.manual_seed(it)
        rows.append(module.train_step(G, D, z, x)[:, :2])
    return torch.stack(rows)


def chosen(module, cfg, capsys):
    """What the start-up check chose for each side, and what it said."""
    module.check_backward(cfg, 784)
    return dict(module.written_out_confirmed), capsys.readouterr().out


@pytest.mark.parametrize('name, fast', [('leaky_relu_in_D', {'G': True, 'D': True}),
                                        ('second_G_layer_of_256', {'G': True, 'D': True}),
                                        ('tanh_output', {'G': True, 'D': True})])
def test_edits_with_a_written_out_backward_train_it_and_it_equals_autograd(tmp_path, capsys, name, fast):
    module = edited(tmp_path, name)
    cfg = module.parse_args(['--h_dim=32'])
    confirmed, said = chosen(module, cfg, capsys)
    assert confirmed == fast and said == ''
    written_out = losses(module, cfg, 30, confirmed)
    assert torch.allclose(written_out, losses(module, cfg, 30, {}), rtol=0, atol=1e-9)
    assert not torch.allclose(written_out, losses(pg, pg.parse_args(['--h_dim=32']), 30, fast), atol=1e-3)


def test_a_tanh_generator_with_data_in_minus_one_one_equals_its_reference_and_its_pixels_map_back(tmp_path):
    module = edited(tmp_path, 'tanh_output')
    assert_matches_reference(2, module=module, iterations=60)  # the reference takes IMAGE_OUTPUT and as_inputs' data
    pixels = torch.tensor([[0, 255]], dtype=torch.uint8)
    assert module.as_inputs(pixels, F64).tolist() == [[-1.0, 1.0]]
    assert module.as_unit_pixels(torch.tensor([-1.0, 0.0, 1.0])).tolist() == [0.0, 0.5, 1.0]


def test_layer_norm_in_D_trains_through_autograd_as_its_reference(tmp_path, capsys):
    module = edited(tmp_path, 'layer_norm_in_D')
    confirmed, said = chosen(module, module.parse_args([]), capsys)
    assert confirmed == {'G': True} and said.startswith('D trains through autograd (LayerNorm has no written-out')

    def with_layer_norm(ref):
        ref.D = [nn.Sequential(d[0], nn.LayerNorm(32, elementwise_affine=False), *d[1:]) for d in ref.D]
        ref.D_solver = [torch.optim.Adam(d.parameters(), lr=1e-3) for d in ref.D]
    assert_matches_reference(2, module=module, iterations=60, edit_reference=with_layer_norm, h_dim=32)


def test_dropout_in_D_trains_the_gradient_of_its_own_masks_and_is_off_when_sampling(tmp_path, capsys):
    module = edited(tmp_path, 'dropout_in_D')
    cfg = module.parse_args(['--h_dim=32'])
    confirmed, said = chosen(module, cfg, capsys)  # never refused: autograd trains it
    assert confirmed == {'G': True} and 'D trains through autograd (Dropout' in said
    module.check_losses()
    torch.manual_seed(0)
    G, D = module.make_pairs(cfg, 784, CPU, F64)
    z, x = torch.randn(32, 10, dtype=F64), torch.rand(32, 784, dtype=F64)
    fake = module.generate(G, z)
    with torch.enable_grad():  # D's gradient by plain autograd, with the masks that seed 5 draws
        torch.manual_seed(5)
        logit = D['model'](torch.cat([x.expand(2, -1, -1), fake], 1))
        expected = torch.autograd.grad(module.d_loss(logit[:, :32], logit[:, 32:]).sum(), list(D['model'].parameters()))
    torch.manual_seed(5)
    module.d_step(D, x, fake, (None, None))
    for p, grad in zip(D['model'].parameters(), expected):
        assert torch.allclose(p.grad, grad, rtol=0, atol=1e-12)
    scores = [module.cross_scores(D, fake) for _ in range(2)]
    assert torch.equal(*scores)  # eval mode: no dropout when judging
    assert D['model'].training  # and back to training afterwards


def test_per_pair_runs_each_copy_of_a_torch_module_on_its_own_slice():
    torch.manual_seed(0)
    conv = pg.PerPair(3, lambda: nn.Sequential(nn.Unflatten(1, (1, 4, 4)), nn.Conv2d(1, 2, 3, padding=1), nn.Flatten()))
    x = torch.randn(3, 5, 16)
    out = conv(x)
    for i in range(3):
        single = nn.Sequential(nn.Unflatten(1, (1, 4, 4)), nn.Conv2d(1, 2, 3, padding=1), nn.Flatten())
        single.load_state_dict({conv.names[k]: v[i] for k, v in conv.state_dict().items()})
        assert torch.allclose(out[i], single(x[i]), atol=1e-6)
    assert all(p.shape[0] == 3 for p in conv.parameters())


def test_a_convolutional_D_trains_through_autograd_and_compare_works_on_its_runs(tmp_path, tiny_mnist, capsys):
    module = edited(tmp_path, 'conv_D')
    common = [f'--data_root={tiny_mnist}', '--iterations=20', '--log_every=10', '--eval_every=0', '--h_dim=32']
    for seed, K in ((0, 0), (1, 10)):
        assert module.train(module.parse_args([*common, f'--out_dir={tmp_path}/runs/{seed}', f'--seed={seed}',
                                               f'--K={K}'])) == 0
        assert 'D trains through autograd (PerPair has no written-out backward)' in capsys.readouterr().out
    assert module.compare_runs(module.parse_args([f'--compare={tmp_path}/runs', '--eval_samples=200',
                                                  f'--data_root={tiny_mnist}', f'--classifier_dir={tmp_path}/cls'])) == 0
    assert '| K=0 | 1 |' in capsys.readouterr().out
    # the shipped script refuses these runs in one line: its D has other weights
    with pytest.raises(SystemExit) as stop:
        pg.compare_runs(pg.parse_args([f'--compare={tmp_path}/runs', '--eval_samples=200']))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and 'holds other networks than this script builds' in err
    assert len(err.strip().splitlines()) == 1


def test_a_resume_by_a_script_whose_networks_differ_from_the_checkpoints_is_refused_in_one_line(tmp_path, tiny_mnist,
                                                                                                 capsys):
    args = [f'--data_root={tiny_mnist}', f'--out_dir={tmp_path}/run', '--h_dim=16', '--eval_every=0']
    assert pg.train(pg.parse_args([*args, '--iterations=5'])) == 0
    module = edited(tmp_path, 'second_G_layer_of_256')
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:  # a run of the shipped networks, resumed by a script with another G
        module.train(module.parse_args([*args, '--iterations=9', '--resume=True']))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1
    assert 'holds other networks than this script builds (G: (3): Sigmoid() there, (3): ReLU(inplace=True) here)' in err


def test_a_resume_by_a_script_with_another_activation_is_refused_though_no_weight_differs(tmp_path, tiny_mnist, capsys):
    args = [f'--data_root={tiny_mnist}', f'--out_dir={tmp_path}/run', '--h_dim=16', '--eval_every=0']
    module = edited(tmp_path, 'leaky_relu_in_D')
    assert module.train(module.parse_args([*args, '--iterations=5'])) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        pg.train(pg.parse_args([*args, '--iterations=9', '--resume=True']))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1
    assert '(D: (1): LeakyReLU(negative_slope=0.2, inplace=True) there, (1): ReLU(inplace=True) here)' in err


HINGE = ('return F.softplus(-real_logit).mean((1, 2)) + F.softplus(fake_logit).mean((1, 2))',
         'return F.relu(1 - real_logit).mean((1, 2)) + F.relu(1 + fake_logit).mean((1, 2))')
TINY = ['--dataset=ring8', '--h_dim=16', '--log_every=10', '--sample_every=1000', '--eval_every=0']


def test_a_resume_by_other_code_stops_naming_what_differs_unless_asked(tmp_path, capsys):
    """The checkpoint keeps a fingerprint of the algorithm part; the edited script refuses to continue the
    unedited script's run in one line naming d_loss, and continues it with --resume_edited=True."""
    out = f'--out_dir={tmp_path / "run"}'
    assert pg.train(pg.parse_args([*TINY, '--iterations=20', out])) == 0
    module, _ = edited_copy(tmp_path, HINGE)
    with pytest.raises(SystemExit) as stop:
        module.train(module.parse_args([*TINY, '--iterations=40', out, '--resume=True']))
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1
    assert "the algorithm's code differs" in err and '(d_loss changed)' in err and '--resume_edited=True' in err
    assert module.train(module.parse_args([*TINY, '--iterations=40', out, '--resume=True', '--resume_edited=True'])) == 0
    assert torch.load(tmp_path / 'run' / 'checkpoint.pt', weights_only=True)['code'] == module.algorithm_code()


def test_compare_separates_runs_of_different_code_and_says_so(tmp_path, capsys):
    runs = tmp_path / 'runs'
    for name, seed in (('a', 0), ('b', 1)):
        assert pg.train(pg.parse_args([*TINY, '--iterations=20', f'--seed={seed}', f'--out_dir={runs / name}'])) == 0
    module, _ = edited_copy(tmp_path, HINGE)
    assert module.train(module.parse_args([*TINY, '--iterations=20', '--seed=2', f'--out_dir={runs / "hinge"}'])) == 0
    capsys.readouterr()
    assert pg.compare_runs(pg.parse_args([f'--compare={runs}', '--eval_samples=200'])) == 0
    out = capsys.readouterr().out
    assert 'trained by 2 versions of the code' in out and 'd_loss changed' in out
    assert '| code=1 | 2 |' in out and '| code=2 | 1 |' in out


SPECTRAL_D = (D_LINEAR + """
        if cfg['batch_norm']:""", D_LINEAR.replace('Linear(n, fan_in, h)', 'SpectralLinear(n, fan_in, h)') + """
        if cfg['batch_norm']:""")
SPECTRAL_OUT = (D_HIDDEN, D_HIDDEN.replace('Linear(n, h, 1)', 'SpectralLinear(n, h, 1)'))  # every layer of D


def test_spectral_linear_normalises_each_pair_by_its_own_largest_singular_value():
    torch.manual_seed(0)
    layer = pg.SpectralLinear(3, 7, 5).double()
    with torch.no_grad():
        layer.weight[1] *= 10  # pairs of very different norms
    x = torch.randn(3, 4, 7, dtype=F64)
    for _ in range(50):  # power iteration: one step per training pass
        out = layer(x)
    W = layer.weight.detach()
    sigma = [torch.linalg.matrix_norm(W[i], ord=2) for i in range(3)]
    for i in range(3):
        assert (layer.v[i] @ W[i] @ layer.u[i].T).item() == pytest.approx(sigma[i].item(), rel=1e-9)
        assert torch.allclose(out[i], x[i] @ (W[i] / sigma[i]) + layer.bias[i], rtol=0, atol=1e-9)
    assert sigma[1] > 5 * sigma[0]
    layer.eval()
    u = layer.u.clone()
    layer(x)
    assert torch.equal(layer.u, u)  # judging leaves the estimate alone


def test_the_spectral_norm_recipe_trains_and_each_discriminator_keeps_its_own_estimate(tmp_path):
    module, _ = edited_copy(tmp_path, SPECTRAL_D, SPECTRAL_OUT)
    out = tmp_path / 'run'
    assert module.train(module.parse_args([*TINY, '--iterations=31', '--K=10', f'--out_dir={out}'])) == 0
    state = torch.load(out / 'checkpoint.pt', weights_only=True)
    u = state['D']['model']['0.u']
    assert u.shape == (2, 1, 16) and not torch.allclose(u[0], u[1])
    D = module.make_pairs(module.parse_args(TINY), 2, CPU, torch.float32)[1]
    D['model'].load_state_dict(state['D']['model'])
    D['solver'].load_state_dict(state['D']['solver'])
    before = D['model'][0].u.clone()
    module.swap_discriminators(D, torch.tensor([1, 0]))
    assert torch.equal(D['model'][0].u, before[[1, 0]])  # the estimate moves with its discriminator
    assert [type(layer).__name__ for layer in D['model']].count('SpectralLinear') == 2


@pytest.mark.parametrize('wrap', [nn.utils.spectral_norm, nn.utils.parametrizations.spectral_norm])
def test_per_pair_refuses_parametrised_modules_pointing_to_spectral_linear(wrap, capsys):
    with pytest.raises(SystemExit) as stop:
        pg.PerPair(2, lambda: wrap(nn.Linear(3, 4)))
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and 'SpectralLinear(n, fan_in, fan_out)' in err


SWAP_GENERATORS = ("""    partners = new_partners(cfg, it)
    swap_discriminators(D, partners, procs)""", """    partners = new_partners(cfg, it)
    swap_networks(G, partners, procs)""")


def test_a_swap_of_generators_keeps_each_generator_its_prior_labels_and_rows(tmp_path):
    """With 2 pairs on one shared batch, moving the generators pairs the same networks as GAP's moving of the
    discriminators, only in other slots. So the edited run must train every network exactly as the unedited one,
    with each generator keeping its own prior (prior='mixed': G1 Gaussian, G2 uniform), and write the same
    metrics rows and the same sample grids ("G1 (with D2)" holding the original G1), if its bookkeeping follows
    the generators. Its losses.png says that generators moved."""
    args = ['--dataset=ring8', '--h_dim=16', '--n_pairs=2', '--K=10', '--prior=mixed', '--iterations=31', '--log_every=10',
            '--sample_every=30', '--eval_every=30', '--eval_samples=300']
    assert pg.train(pg.parse_args([*args, f'--out_dir={tmp_path / "D"}'])) == 0  # swaps after 10, 20, 30: an odd number
    module, _ = edited_copy(tmp_path, SWAP_GENERATORS)
    assert module.train(module.parse_args([*args, f'--out_dir={tmp_path / "G"}'])) == 0
    by_d, by_g = (torch.load(tmp_path / side / 'checkpoint.pt', weights_only=True) for side in 'DG')
    assert by_d['pairing'] == [1, 0] and by_d['generators'] == [0, 1] and by_d['moved'] == ['D']
    assert by_g['pairing'] == [0, 1] and by_g['generators'] == [1, 0] and by_g['moved'] == ['G']
    for side in ('G', 'D'):  # network k of either run, wherever it sits
        ours, theirs = (torch.cat([p.flatten(1) for p in state[side]['model'].values()], 1) for state in (by_g, by_d))
        origin = by_g['generators' if side == 'G' else 'pairing'], by_d['generators' if side == 'G' else 'pairing']
        assert torch.allclose(ours[torch.tensor(origin[0]).argsort()], theirs[torch.tensor(origin[1]).argsort()],
                              rtol=0, atol=1e-6)
    rows = [(tmp_path / side / 'metrics.csv').read_text() for side in 'DG']
    assert rows[0] == rows[1]  # generator k's metrics and its scores by D1, D2, whichever slots they hold
    import matplotlib.image
    grids = [matplotlib.image.imread(tmp_path / side / '001.png') for side in 'DG']
    assert grids[0].shape == grids[1].shape and (abs(grids[0] - grids[1]) > 1.5 / 255).sum() == 0
    assert module.swaps_title(by_g['swaps'], set(by_g['moved'])) == '3 swaps of generators (grey lines)'
    resumed = f'--out_dir={tmp_path / "G, resumed"}'  # stopped after one swap of generators, then resumed
    assert module.train(module.parse_args([*args, resumed, '--iterations=16'])) == 0
    assert module.train(module.parse_args([*args, resumed, '--resume=True'])) == 0
    again = torch.load(tmp_path / 'G, resumed' / 'checkpoint.pt', weights_only=True)
    assert again['generators'] == [1, 0] and all(torch.equal(again['G']['model'][k], v)
                                                 for k, v in by_g['G']['model'].items())
    assert pg.swaps_title(by_d['swaps'], set(by_d['moved'])) == '3 swaps of discriminators (grey lines)'


def test_each_generator_keeps_its_own_noise_and_prior_wherever_the_swaps_put_it():
    """Moving both sides by one permutation changes slots only: with each generator's own noise and the mixed
    prior, the evaluation's rows (by generator) and the noise each generator gets stay the same."""
    cfg = pg.parse_args(['--n_pairs=3', '--dataset=ring8', '--h_dim=16', '--own_noise=True', '--prior=mixed',
                         '--eval_samples=300'])
    torch.manual_seed(0)
    G, D = pg.make_pairs(cfg, 2, CPU, torch.float32)
    evaluator = pg.Evaluator(cfg, CPU, torch.float32, *pg.training_data(cfg))
    before = evaluator(G, D, it=10)
    z = pg.draw_noise(cfg, 5, torch.Generator().manual_seed(1), torch.float32)
    for side in (G, D):
        side['solver'].step()  # zero gradients: Adam's state, the weights unchanged
        pg.swap_networks(side, torch.tensor([2, 0, 1]))
    assert G['origin'] == [2, 0, 1] and D['origin'] == [2, 0, 1]
    assert torch.equal(pg.to_slots(z, G)[0], z[2])  # slot 0 holds G3: G3's draw, from its uniform prior
    after = evaluator(G, D, it=10)
    for a, b in zip(before, after):
        assert a.keys() == b.keys() and a['generator'] == b['generator']
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9, nan_ok=True), key
    assert before[0]['fd'] != before[2]['fd']  # the generators differ
