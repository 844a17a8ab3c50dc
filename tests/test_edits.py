"""Researchers' edits of the networks, the losses and the optimisers, each made in a copy of the script as the
README's "Editing the script" says, and each checked to train the right gradients (against autograd on the real
networks, or against the reference loop with the same edit), to swap and to resume."""
import math
import subprocess
import sys
from copy import deepcopy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import parallel_gan as pg
from conftest import SCRIPT, ctrl_c_at, edited_copy, load
from test_gap import assert_matches_reference
from test_run import assert_same_run

F64, CPU = torch.float64, torch.device('cpu')

D_HIDDEN = ("""        layers.append(nn.ReLU(inplace=True))
    return Networks(*layers, Linear(n, h, 1))""")
D_LINEAR = """    for fan_in in [x_dim * cfg['pack']] + [h] * (cfg['layers'] - 1):
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


def leaky_relu_in_D(ref):
    """The reference's discriminators with the leaky_relu_in_D edit (and fresh optimisers for them)."""
    ref.D = [nn.Sequential(d[0], nn.LeakyReLU(0.2), d[2]) for d in ref.D]
    ref.D_solver = [torch.optim.Adam(d.parameters(), lr=1e-3) for d in ref.D]


def test_leaky_relu_in_D_trains_as_its_reference_and_not_as_the_shipped_script(tmp_path):
    leaky = assert_matches_reference(2, module=edited(tmp_path, 'leaky_relu_in_D'), iterations=60,
                                     edit_reference=leaky_relu_in_D, h_dim=32)
    assert not torch.allclose(leaky, assert_matches_reference(2, iterations=60, h_dim=32), atol=1e-3)


def test_a_second_generator_layer_trains_as_its_reference(tmp_path):
    def second_layer(ref):
        ref.G = [nn.Sequential(nn.Sequential(g[0][0], g[0][1], nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 784)), g[1])
                 for g in ref.G]
        ref.G_solver = [torch.optim.Adam(g.parameters(), lr=1e-3) for g in ref.G]
    module = edited(tmp_path, 'second_G_layer_of_256')
    assert [type(layer).__name__ for layer in module.generator(2, module.parse_args(['--h_dim=32']), 784)] == \
        ['Linear', 'ReLU', 'Linear', 'ReLU', 'Linear', 'Sigmoid']
    assert_matches_reference(2, module=module, iterations=60, edit_reference=second_layer, h_dim=32)


def test_a_tanh_generator_with_data_in_minus_one_one_equals_its_reference_and_its_pixels_map_back(tmp_path):
    module = edited(tmp_path, 'tanh_output')
    assert_matches_reference(2, module=module, iterations=60)  # the reference takes IMAGE_OUTPUT and as_inputs' data
    pixels = torch.tensor([[0, 255]], dtype=torch.uint8)
    assert module.as_inputs(pixels, F64).tolist() == [[-1.0, 1.0]]
    assert module.as_unit_pixels(torch.tensor([-1.0, 0.0, 1.0])).tolist() == [0.0, 0.5, 1.0]


def test_layer_norm_in_D_trains_as_its_reference(tmp_path):
    module = edited(tmp_path, 'layer_norm_in_D')

    def with_layer_norm(ref):
        ref.D = [nn.Sequential(d[0], nn.LayerNorm(32, elementwise_affine=False), *d[1:]) for d in ref.D]
        ref.D_solver = [torch.optim.Adam(d.parameters(), lr=1e-3) for d in ref.D]
    assert_matches_reference(2, module=module, iterations=60, edit_reference=with_layer_norm, h_dim=32)


def test_dropout_in_D_trains_the_gradient_of_its_own_masks_and_is_off_when_sampling(tmp_path):
    module = edited(tmp_path, 'dropout_in_D')
    cfg = module.parse_args(['--h_dim=32'])
    torch.manual_seed(0)
    pairs = module.make_pairs(cfg, 784, CPU, F64)
    G, D = pairs['G'], pairs['D']
    z, x = torch.randn(32, 10, dtype=F64), torch.rand(32, 784, dtype=F64)
    fake = G.model(z).detach()  # G has no dropout: the samples of the step

    def d_gradient(seed):  # D's gradient by plain autograd on a copy, with the masks that seed draws
        copy = deepcopy(D.model)
        torch.manual_seed(seed)
        real_logit, fake_logit = copy(x), copy(fake)  # in the step's order: real, then fake
        return torch.autograd.grad(module.d_loss(real_logit, fake_logit).sum(), list(copy.parameters()))
    expected, other_masks = d_gradient(5), d_gradient(6)
    torch.manual_seed(5)
    module.train_step(G, D, z, x)
    for p, grad, other in zip(D.model.parameters(), expected, other_masks):
        assert torch.allclose(p.grad, grad, rtol=0, atol=1e-12)
        assert not torch.allclose(p.grad, other, rtol=0, atol=1e-6)  # the masks matter
    scores = [module.cross_scores({"D": D}, fake, None) for _ in range(2)]
    assert torch.equal(*scores)  # eval mode: no dropout when judging
    assert D.model.training  # and back to training afterwards


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


def test_a_convolutional_D_trains_swaps_and_compare_works_on_its_runs(tmp_path, tiny_mnist, capsys):
    module = edited(tmp_path, 'conv_D')
    common = [f'--data_root={tiny_mnist}', '--iterations=20', '--log_every=10', '--eval_every=0', '--h_dim=32']
    for seed, K in ((0, 0), (1, 10)):
        assert module.train(module.parse_args([*common, f'--out_dir={tmp_path}/runs/{seed}', f'--seed={seed}',
                                               f'--K={K}'])) == 0
    state = load(tmp_path / 'runs' / '1' / 'checkpoint.pt')
    assert state['swaps'] == [10] and state['pairs']['D']['origin'] == [1, 0]
    assert state['pairs']['D']['model']['0.1__weight'].shape == (2, 8, 1, 4, 4)  # Conv2d(1, 8, 4) per pair
    assert module.compare_runs(module.parse_args([f'--compare={tmp_path}/runs', '--eval_samples=200',
                                                  f'--data_root={tiny_mnist}', f'--classifier_dir={tmp_path}/cls'])) == 0
    assert '| K=0 | 1 |' in capsys.readouterr().out
    # the shipped script refuses these runs in one line: its D has other weights
    with pytest.raises(SystemExit) as stop:
        pg.compare_runs(pg.parse_args([f'--compare={tmp_path}/runs', '--eval_samples=200']))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and 'holds other networks than this script builds' in err
    assert len(err.strip().splitlines()) == 1


def resume_refused(capsys, module, args):
    """The one-line refusal (status 2) of module's resume with args."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        module.train(module.parse_args(args))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1
    return err


def test_a_resume_by_a_script_whose_networks_differ_from_the_checkpoints_is_refused_in_one_line(tmp_path, tiny_mnist,
                                                                                                 capsys):
    """By the code's fingerprint; and, when asked to go on with the edited code, by the networks' weights."""
    args = [f'--data_root={tiny_mnist}', f'--out_dir={tmp_path}/run', '--h_dim=16', '--eval_every=0']
    assert pg.train(pg.parse_args([*args, '--iterations=5'])) == 0
    module = edited(tmp_path, 'second_G_layer_of_256')  # a run of the shipped networks, resumed by a script with another G
    err = resume_refused(capsys, module, [*args, '--iterations=9', '--resume=True'])
    assert "the algorithm's code differs" in err and '(generator changed)' in err
    err = resume_refused(capsys, module, [*args, '--iterations=9', '--resume=True', '--resume_edited=True'])
    assert 'holds other networks than this script builds (G: size mismatch for 2.' in err


def test_a_resume_by_a_script_with_another_activation_is_refused_though_no_weight_differs(tmp_path, tiny_mnist, capsys):
    args = [f'--data_root={tiny_mnist}', f'--out_dir={tmp_path}/run', '--h_dim=16', '--eval_every=0']
    module = edited(tmp_path, 'leaky_relu_in_D')
    assert module.train(module.parse_args([*args, '--iterations=5'])) == 0
    err = resume_refused(capsys, pg, [*args, '--iterations=9', '--resume=True'])
    assert "the algorithm's code differs" in err and '(discriminator changed)' in err and '--resume_edited=True' in err


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


def test_a_statistic_added_by_an_edit_resumed_mid_log_keeps_every_line_and_curve(tmp_path, monkeypatch, capsys):
    """An edit adds a logged statistic and resumes a run stopped between log lines (--resume_edited=True): the
    saved iterations get their own line under the old statistics, then the new one is logged, and losses.png
    draws every loss over every line that has it."""
    out = f'--out_dir={tmp_path / "run"}'
    ctrl_c_at(monkeypatch, 16)
    assert pg.train(pg.parse_args([*TINY, '--iterations=40', out])) == 130
    monkeypatch.undo()
    module, _ = edited_copy(tmp_path, ("""'D(G(z))': torch.sigmoid(fake_logit).mean((1, 2))}""",
                                       """'D(G(z))': torch.sigmoid(fake_logit).mean((1, 2)), 'twice_D_loss': 2 * D_loss}"""))
    figures = []
    monkeypatch.setattr(module, 'save_figure', lambda fig, path: figures.append(fig))
    assert module.train(module.parse_args([*TINY, '--iterations=40', out, '--resume=True', '--resume_edited=True'])) == 0
    rows = load(tmp_path / 'run' / 'checkpoint.pt')['log']['history']
    assert [row['iteration'] for row in rows] == [0, 10, 16, 20, 30, 39]
    logged = [line for line in capsys.readouterr().out.splitlines() if line.startswith('it ')]
    assert logged[-4].startswith('it      16 | D_loss') and logged[-4].endswith('| saved before the resume')
    assert 'twice_D_loss' in logged[-3] and 'it/s' in logged[-3]
    assert ['twice_D_loss' in row for row in rows] == [False, False, False, True, True, True]
    axes = figures[-1].axes
    assert [ax.get_ylabel() for ax in axes] == ['D_loss', 'G_loss', 'twice_D_loss']
    assert [len(axes[k].get_lines()[0].get_xdata()) for k in range(3)] == [6, 6, 3]


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
    u = state['pairs']['D']['model']['0.u']
    assert u.shape == (2, 1, 16) and not torch.allclose(u[0], u[1])
    D = module.make_pairs(module.parse_args(TINY), 2, CPU, torch.float32)['D']
    D.load_state_dict(state['pairs']['D'])
    before = D.model[0].u.clone()
    module.swap_discriminators(D, torch.tensor([1, 0]))
    assert torch.equal(D.model[0].u, before[[1, 0]])  # the estimate moves with its discriminator
    assert [type(layer).__name__ for layer in D.model].count('SpectralLinear') == 2


@pytest.mark.parametrize('wrap', ['spectral_norm', 'parametrizations.spectral_norm'])
def test_per_pair_refuses_parametrised_modules_pointing_to_spectral_linear(tmp_path, wrap, capsys):
    """PerPair raises; a run of a script whose D uses it is refused in one line, before any training."""
    with pytest.raises(ValueError, match=r'SpectralLinear\(n, fan_in, fan_out\)'):
        pg.PerPair(2, lambda: eval(f'nn.utils.{wrap}')(nn.Linear(3, 4)))
    module, _ = edited_copy(tmp_path, ('return Networks(*layers, Linear(n, h, 1))',
                                       f'return Networks(*layers, PerPair(n, lambda: nn.utils.{wrap}(nn.Linear(h, 1))))'))
    with pytest.raises(SystemExit) as stop:
        module.train(module.parse_args([*TINY, '--iterations=5', f'--out_dir={tmp_path / "run"}']))
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1
    assert 'cannot build the networks: PerPair cannot stack parametrised modules' in err
    assert 'SpectralLinear(n, fan_in, fan_out)' in err and not (tmp_path / 'run' / 'checkpoint.pt').exists()


def test_a_layer_whose_weights_are_not_one_per_pair_is_refused_in_one_line(tmp_path, capsys):
    """A plain torch layer with weights (nn.LayerNorm(h)) in place of a pair-batched one."""
    module, _ = edited_copy(tmp_path, (D_LINEAR, D_LINEAR + "\n        layers.append(nn.LayerNorm(h))"))
    with pytest.raises(SystemExit) as stop:
        module.train(module.parse_args([*TINY, '--iterations=5', f'--out_dir={tmp_path / "run"}']))
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1
    assert 'D.1.weight, D.1.bias has no leading pairs dimension' in err and 'PerPair(n, lambda: your_layer)' in err


SWAP_GENERATORS = ("        swap_discriminators(D, new_partners(cfg, it), cfg['swap_moves'])",
                   '        swap_networks(G, new_partners(cfg, it))')


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
    origins = lambda state: (state['pairs']['D']['origin'], state['pairs']['G']['origin'])
    assert origins(by_d) == ([1, 0], [0, 1]) and by_d['moved'] == ['D']
    assert origins(by_g) == ([0, 1], [1, 0]) and by_g['moved'] == ['G']
    for side in ('G', 'D'):  # network k of either run, wherever it sits
        ours, theirs = (torch.cat([p.flatten(1) for p in state['pairs'][side]['model'].values()], 1)
                        for state in (by_g, by_d))
        origin = by_g['pairs'][side]['origin'], by_d['pairs'][side]['origin']
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
    assert again['pairs']['G']['origin'] == [1, 0] and all(torch.equal(again['pairs']['G']['model'][k], v)
                                                           for k, v in by_g['pairs']['G']['model'].items())
    assert pg.swaps_title(by_d['swaps'], set(by_d['moved'])) == '3 swaps of discriminators (grey lines)'


def test_each_generator_keeps_its_own_noise_and_prior_wherever_the_swaps_put_it():
    """Moving both sides by one permutation changes slots only: with each generator's own noise and the mixed
    prior, the evaluation's rows (by generator) and the noise each generator gets stay the same."""
    cfg = pg.parse_args(['--n_pairs=3', '--dataset=ring8', '--h_dim=16', '--own_noise=True', '--prior=mixed',
                         '--eval_samples=300'])
    torch.manual_seed(0)
    pairs = pg.make_pairs(cfg, 2, CPU, torch.float32)
    evaluator = pg.Evaluator(cfg, CPU, torch.float32, *pg.training_data(cfg))
    before = evaluator(pairs, it=10)
    z = pg.draw_noise(cfg, 5, torch.Generator().manual_seed(1), torch.float32)
    for side in pairs.values():
        for p in side.model.parameters():
            p.grad = torch.zeros_like(p)
        side.optimizer.step()  # zero gradients: Adam's state, the weights unchanged
        pg.swap_networks(side, torch.tensor([2, 0, 1]))
    G, D = pairs['G'], pairs['D']
    assert G.origin == [2, 0, 1] and D.origin == [2, 0, 1]
    assert torch.equal(pg.to_slots(z, G)[0], z[2])  # slot 0 holds G3: G3's draw, from its uniform prior
    after = evaluator(pairs, it=10)
    for a, b in zip(before, after):
        assert a.keys() == b.keys() and a['generator'] == b['generator']
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9, nan_ok=True), key
    assert before[0]['fd'] != before[2]['fd']  # the generators differ


# ------------------------------------------------------------------------------------
# other optimisers and losses: any torch.optim optimiser over a side is one per network, moved by a swap and kept
# by a checkpoint; settings the code gives it (its own lr) stay the code's

ADAM = "    {side}_optimizer = torch.optim.Adam({side}.parameters(), lr=cfg['lr'], betas=(cfg['beta1'], 0.999), fused=True)"
SGD_D = (ADAM.format(side='D'), "    D_optimizer = torch.optim.SGD(D.parameters(), lr=0.01, momentum=0.9)")
RMSPROP = [(ADAM.format(side=side), f"    {side}_optimizer = torch.optim.RMSprop({side}.parameters(), lr=cfg['lr'])")
           for side in 'GD']
HINGE_G = ('return F.softplus(-fake_logit).mean((1, 2))', 'return -fake_logit.mean((1, 2))')


def whole_and_split(module, tmp_path, *args, iterations=40):
    """A run of `iterations`, and the same run stopped after its log line half-way and resumed: both checkpoints."""
    for out, until, resume in (('whole', iterations, False), ('split', iterations // 2 + 1, False),
                               ('split', iterations, True)):
        assert module.train(module.parse_args([*TINY, *args, f'--out_dir={tmp_path / out}', f'--iterations={until}',
                                               f'--resume={resume}'])) == 0
    return load(tmp_path / 'whole' / 'checkpoint.pt'), load(tmp_path / 'split' / 'checkpoint.pt')


def test_an_sgd_discriminator_keeps_its_momentum_through_swaps_and_its_own_lr_through_a_resume(tmp_path, monkeypatch,
                                                                                                capsys):
    module, _ = edited_copy(tmp_path, SGD_D)
    cfg = module.parse_args([*TINY, '--n_pairs=3'])
    torch.manual_seed(0)
    pairs = module.make_pairs(cfg, 2, CPU, F64)
    G, D = pairs['G'], pairs['D']
    assert isinstance(D.optimizer, torch.optim.SGD) and isinstance(G.optimizer, torch.optim.Adam)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        module.train_step(G, D, torch.randn(3, 32, 10, generator=g, dtype=F64), torch.randn(32, 2, generator=g, dtype=F64))
    momentum = [D.optimizer.state[p]['momentum_buffer'].clone() for p in D.model.parameters()]
    weights = [p.detach().clone() for p in D.model.parameters()]
    assert not torch.equal(momentum[0][0], momentum[0][1])
    partners = torch.tensor([2, 0, 1])
    module.swap_discriminators(D, partners)  # each slot's momentum moves with its network
    for p, m, w in zip(D.model.parameters(), momentum, weights):
        assert torch.equal(p, w[partners]) and torch.equal(D.optimizer.state[p]['momentum_buffer'], m[partners])
    assert D.origin == [2, 0, 1]

    lrs, step = [], module.train_step  # every step's (G's lr, D's lr)

    def recording(G, D, *args):
        lrs.append((G.optimizer.param_groups[0]['lr'], D.optimizer.param_groups[0]['lr']))
        return step(G, D, *args)
    monkeypatch.setattr(module, 'train_step', recording)
    whole, split = whole_and_split(module, tmp_path, '--n_pairs=3', '--K=5', '--sample_every=10')
    assert lrs == [(1e-3, 0.01)] * 80  # 40 iterations of the whole run, 21 + 19 of the split one
    assert_same_run(whole, split)
    assert whole['swaps'] == [5, 10, 15, 20, 25, 30, 35] and whole['moved'] == ['D']
    saved = whole['pairs']['D']['optimizer']
    assert saved['param_groups'][0]['lr'] == 0.01 and saved['state'][0]['momentum_buffer'].shape[0] == 3
    lrs.clear()  # a resume with another lr: G's Adam takes it, D's SGD keeps the lr of its code
    assert module.train(module.parse_args([f'--out_dir={tmp_path / "split"}', '--resume=True', '--iterations=45',
                                           '--lr=2e-3'])) == 0
    assert 'lr=0.001 there, 0.002 now' in capsys.readouterr().out
    assert lrs == [(2e-3, 0.01)] * 5
    assert load(tmp_path / 'split' / 'checkpoint.pt')['pairs']['D']['optimizer']['param_groups'][0]['lr'] == 0.01


def test_rmsprop_on_both_sides_trains_swaps_and_resumes_exactly(tmp_path):
    module, _ = edited_copy(tmp_path, *RMSPROP)
    whole, split = whole_and_split(module, tmp_path, '--n_pairs=2', '--K=5', '--sample_every=15')
    assert_same_run(whole, split)
    for side in ('G', 'D'):
        state = whole['pairs'][side]['optimizer']['state'][0]
        assert set(state) == {'step', 'square_avg'} and state['square_avg'].shape[0] == 2 and state['step'] == 40
    assert len(whole['swaps']) == 7 and all(math.isfinite(v) for row in whole['log']['history']
                                            for name in whole['log']['names'] for v in row[name])


def test_a_hinge_loss_and_leaky_relu_in_D_train_by_the_same_step_as_their_reference(tmp_path):
    module, _ = edited_copy(tmp_path, HINGE, HINGE_G, EDITS['leaky_relu_in_D'])
    hinge = (lambda real, fake: F.relu(1 - real).mean() + F.relu(1 + fake).mean(), lambda fake: -fake.mean())
    assert_matches_reference(2, module=module, iterations=60, losses=hinge, edit_reference=leaky_relu_in_D, h_dim=32)
    whole, split = whole_and_split(module, tmp_path, '--K=5', '--sample_every=15')
    assert_same_run(whole, split)
    first = whole['log']['history'][0]
    assert all(abs(v - 2) < 0.5 for v in first['D_loss'])  # hinge: 2 - D(x) + D(G(z)) at logits near 0, not 1.39


G_FIRST = (  # a side without an optimiser: the generators as they started, saved and drawn from but never trained
    ("    return {'G': Side(G, G_optimizer, cfg['n_pairs']), 'D': Side(D, D_optimizer, cfg['n_pairs'])}",
     "    G_first = generator(n, cfg, x_dim).to(dev, dtype)\n"
     "    G_first.load_state_dict(G.state_dict())\n"
     "    return {'G': Side(G, G_optimizer, cfg['n_pairs']), 'D': Side(D, D_optimizer, cfg['n_pairs']),\n"
     "            'G_first': Side(G_first, None, cfg['n_pairs'])}"),
    ("    return pairs['G'].model(z)", "    return pairs['G_first'].model(z)"))


def test_a_side_without_an_optimiser_is_saved_resumed_and_draws_the_samples_with_no_edit_below(tmp_path, capsys):
    module, _ = edited_copy(tmp_path, *G_FIRST)
    whole, split = whole_and_split(module, tmp_path, '--n_pairs=2', '--K=5', '--sample_every=15', '--eval_every=20')
    assert_same_run(whole, split)
    assert 'cannot' not in capsys.readouterr().out
    assert whole['pairs']['G_first']['optimizer'] is None
    cfg = module.parse_args([*TINY, '--n_pairs=2'])
    torch.manual_seed(cfg['seed'])
    fresh = module.make_pairs(cfg, 2, CPU, torch.float32)
    for name, first in whole['pairs']['G_first']['model'].items():  # never trained: as G started, not as it ended
        assert torch.equal(first, fresh['G'].model.state_dict()[name])
        assert not torch.equal(first, whole['pairs']['G']['model'][name])
    z = torch.randn(1, 5, cfg['z_dim'])
    assert torch.equal(module.generate(fresh, z, None), fresh['G_first'].model(z).detach())
    assert len(list((tmp_path / 'whole').glob('0*.png'))) == 4  # iterations 0, 15, 30 and the last


def test_a_slip_in_draw_samples_stops_the_run_and_a_side_added_later_cannot_join_a_resume(tmp_path, capsys):
    """A KeyError is the code's, not a network's that cannot take its input: it is raised, not reported and skipped.
    A side the checkpoint lacks is refused in one line that says so."""
    slip, _ = edited_copy(tmp_path, ("    return pairs['G'].model(z)", "    return pairs['G_emma'].model(z)"))
    with pytest.raises(KeyError, match='G_emma'):
        slip.train(slip.parse_args([*TINY, f'--out_dir={tmp_path / "slip"}', '--iterations=3']))
    assert pg.train(pg.parse_args([*TINY, f'--out_dir={tmp_path / "run"}', '--iterations=3'])) == 0
    (tmp_path / 'later').mkdir()
    later, _ = edited_copy(tmp_path / 'later', *G_FIRST)
    with pytest.raises(SystemExit) as stop:
        later.train(later.parse_args([*TINY, f'--out_dir={tmp_path / "run"}', '--iterations=6', '--resume=True',
                                      '--resume_edited=True']))
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and 'holds no G_first, which this script now builds' in err and '\n' not in err


# the README's R1 recipe: its weight in the block, train_step given it, the textbook penalty on the real inputs
R1 = (("clip = 0.0  # clip each network's gradient", "r1 = 10.0  # R1 penalty weight: r1/2 E|grad_x D(x)|^2 on real data\n"
       "clip = 0.0  # clip each network's gradient"),
      ("def train_step(G, D, z, x, y=None, input_noise=(None, None, None), clip=0.0):",
       "def train_step(G, D, z, x, y=None, input_noise=(None, None, None), clip=0.0, r1=0.0):"),
      ("    real_logit = D.model(noisy(x, input_noise[0]))\n", "    real_x = noisy(x, input_noise[0]).requires_grad_(True)\n"
       "    real_logit = D.model(real_x)\n"),
      ("    D_loss = d_loss(real_logit, fake_logit)\n",
       "    grad, = torch.autograd.grad(real_logit.sum(), real_x, create_graph=True)\n"
       "    R1 = grad.square().sum(2).mean(1)  # each pair's mean squared gradient norm on its real batch\n"
       "    D_loss = d_loss(real_logit, fake_logit) + r1 / 2 * R1\n"),
      ("'D(G(z))': torch.sigmoid(fake_logit).mean((1, 2))}", "'D(G(z))': torch.sigmoid(fake_logit).mean((1, 2)), 'R1': R1}"),
      ("    stats = train_step(G, D, z, x, y, input_noise, cfg['clip'])",
       "    stats = train_step(G, D, z, x, y, input_noise, cfg['clip'], cfg['r1'])"))


def test_an_r1_penalty_written_the_textbook_way_is_each_pairs_own(tmp_path):
    """Under the script's conditions every pair sees the same real batch; the R1 recipe's gradient with respect to
    it is still each pair's own: the same penalties, losses and D weights as a plain loop that takes R1 of one GAN
    at a time, through swaps; the penalty is logged per pair, and a run trains and resumes with it."""
    module, _ = edited_copy(tmp_path, *R1)
    assert_matches_reference(2, module=module, iterations=40, K=10, h_dim=32,
                             edit_reference=lambda ref: setattr(ref, 'r1', 10.0), train_step_args=(10.0,))
    cfg = module.parse_args(['--n_pairs=2', '--h_dim=32'])
    torch.manual_seed(0)
    pairs = module.make_pairs(cfg, 784, CPU, F64)
    D_before = deepcopy(pairs['D'].model)
    x = torch.rand(1, 32, 784, dtype=F64).expand(2, -1, -1)  # one batch, viewed once per pair (gap_iteration's)
    stats = module.train_step(pairs['G'], pairs['D'], torch.randn(1, 32, 10, dtype=F64), x, None, (None,) * 3, 0.0,
                              10.0)
    own = []
    for i in range(2):  # pair i's penalty: its own D before the step, on the batch alone
        x_i = x[i].clone().requires_grad_(True)
        grad, = torch.autograd.grad(D_before(x_i[None])[i].sum(), x_i)
        own.append(grad.square().sum(1).mean())
    assert torch.allclose(stats['R1'], torch.stack(own), rtol=0, atol=1e-12)
    assert not torch.allclose(stats['R1'][0], stats['R1'][1])  # two discriminators, two penalties
    whole, split = whole_and_split(module, tmp_path, '--n_pairs=2', '--K=5')
    assert_same_run(whole, split)
    assert all(len(row['R1']) == 2 for row in whole['log']['history'])


TTUR = (("lr = 1e-3  # learning rate of every network (its optimiser: Adam, in make_pairs)",
         "lr_G = 1e-4  # the generators' learning rate (two time-scale update rule, TTUR)\n"
         "lr_D = 4e-4  # the discriminators' learning rate"),
        ("G.parameters(), lr=cfg['lr'],", "G.parameters(), lr=cfg['lr_G'],"),
        ("D.parameters(), lr=cfg['lr'],", "D.parameters(), lr=cfg['lr_D'],"))


def test_two_learning_rates_replace_lr_and_either_changes_on_a_resume(tmp_path, capsys):
    """The README's TTUR recipe: lr_G and lr_D in place of lr. The run trains each side at its own rate; a resume
    with a new lr_D is accepted, said, and trains D at it from there, G at its own; --lr is no name any more."""
    module, script = edited_copy(tmp_path, *TTUR)
    out = f'--out_dir={tmp_path / "run"}'
    assert module.train(module.parse_args([*TINY, '--iterations=12', out])) == 0
    rates = lambda state: [state['pairs'][side]['optimizer']['param_groups'][0]['lr'] for side in ('G', 'D')]
    assert rates(load(tmp_path / 'run' / 'checkpoint.pt')) == [1e-4, 4e-4]
    assert module.train(module.parse_args([*TINY, '--iterations=20', out, '--resume=True', '--lr_D=1e-3'])) == 0
    assert 'with these changes: lr_D=0.0004 there, 0.001 now; iterations=12 there, 20 now' in capsys.readouterr().out
    state = load(tmp_path / 'run' / 'checkpoint.pt')
    assert rates(state) == [1e-4, 1e-3] and state['hyperparameters']['lr_D'] == 1e-3
    assert 'lr' not in state['hyperparameters']
    with pytest.raises(SystemExit) as stop:
        module.parse_args(['--lr=5e-4'])
    assert stop.value.code == 2 and "unknown argument '--lr=5e-4'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        module.parse_args(['--lr_D=0'])
    assert 'lr_D must be a positive number' in capsys.readouterr().err


def test_a_name_that_no_code_reads_is_said_to_change_nothing(tmp_path, capsys):
    """The TTUR recipe with `lr` left in the block: --lr is accepted, and one line says that it changes nothing;
    a name the code reads is given silently."""
    module, _ = edited_copy(tmp_path, *TTUR[1:], ("lr = 1e-3  # learning rate",
                                                  "lr_G = 1e-4  # G's\nlr_D = 4e-4  # D's\nlr = 1e-3  # learning rate"))
    module.parse_args(['--lr=5e-4', '--lr_D=1e-3'])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"parallel_gan.py: warning: --lr changes nothing: no code in parallel_gan.py reads cfg['lr']"]


def test_a_statistic_of_another_shape_is_refused_in_one_line_and_one_value_for_all_is_shown_for_each_pair(tmp_path):
    ends = "'D(G(z))': torch.sigmoid(fake_logit).mean((1, 2))}"
    bad, script = edited_copy(tmp_path, (ends, ends[:-1] + ", 'fake_mean': fake.mean((2,))}"))
    result = subprocess.run([sys.executable, script, *TINY, '--iterations=5', f'--out_dir={tmp_path / "bad"}'],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert result.stderr.strip() == ("parallel_gan.py: the statistic 'fake_mean' that train_step returns has shape "
                                     "(2, 32); a statistic is one value per pair, (2,), or one value for all pairs, ()")
    (tmp_path / 'word').mkdir()
    _, script = edited_copy(tmp_path / 'word', (ends, ends[:-1] + ", 'note': 'hello'}"))
    result = subprocess.run([sys.executable, script, *TINY, '--iterations=5', f'--out_dir={tmp_path / "word"}'],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.strip().startswith(
        "parallel_gan.py: the statistic 'note' that train_step returns is str, not a number or tensor;")
    (tmp_path / 'good').mkdir()
    good, script = edited_copy(tmp_path / 'good', (ends, ends[:-1] + ", 'lr_now': D.optimizer.param_groups[0]['lr']}"))
    result = subprocess.run([sys.executable, script, *TINY, '--iterations=5', '--log_every=4',
                             f'--out_dir={tmp_path / "good"}'], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and '| lr_now 0.001/0.001 |' in result.stdout


ENCODER = (("    return {'G': Side(G, G_optimizer, cfg['n_pairs']), 'D': Side(D, D_optimizer, cfg['n_pairs'])}",
            "    E = discriminator(n, {**cfg, 'h_dim': 8}, x_dim).to(dev, dtype)  # an encoder's stand-in\n"
            "    E_optimizer = torch.optim.Adam(E.parameters(), lr=cfg['lr'])\n"
            "    return {'G': Side(G, G_optimizer, cfg['n_pairs']), 'D': Side(D, D_optimizer, cfg['n_pairs']),\n"
            "            'E': Side(E, E_optimizer, cfg['n_pairs'])}"),)


def test_same_init_starts_every_side_alike_an_added_one_too(tmp_path):
    module, _ = edited_copy(tmp_path, *ENCODER)
    for same in (True, False):
        out = tmp_path / f'same_{same}'
        assert module.train(module.parse_args([*TINY, '--n_pairs=3', '--own_noise=True', f'--same_init={same}',
                                               '--iterations=1', '--K=0', f'--out_dir={out}'])) == 0
        for side in ('E', 'G', 'D'):
            weights = load(out / 'checkpoint.pt')['pairs'][side]['model'].values()
            alike = all(torch.equal(t[k], t[0]) for t in weights for k in range(3))
            assert alike == (same and side == 'E'), (side, same)  # G and D took a step: they differ again


def test_a_renamed_copy_of_the_script_names_itself(tmp_path):
    copy = tmp_path / 'my_gan.py'
    copy.write_text(open(SCRIPT).read())
    result = subprocess.run([sys.executable, str(copy), '--pack=3'], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.startswith('my_gan.py: error: mb_size=32 cannot be cut')
