"""Stacked MNIST (issue 39): three digits as the colour channels, 1,000 modes, scored as PacGAN and VEEGAN do."""
import math
import os

import pytest
import torch

import parallel_gan as pg
from conftest import SHARED_MNIST, run_script, toy_digits

REAL = pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_MNIST, 'MNIST', 'raw')), reason='real MNIST not present')


@pytest.fixture(scope='module')
def toy_classifier():
    images, labels = toy_digits(400, seed=1)
    return pg.fit_classifier(images.reshape(len(images), -1), labels, epochs=3, dev=torch.device('cpu'), batch_size=16)


def test_a_generator_of_one_fixed_triple_scores_one_mode_and_kl_ln_1000(toy_classifier):
    images, labels = toy_digits(10, seed=2)  # labels 0..9: the digits 3, 5, 7 stacked, as a generator would output
    image = torch.cat([images[3], images[5], images[7]]).reshape(1, 3 * 784).float() / 255
    G = pg.make_pairs({**pg.parse_args([]), 'h_dim': 8}, 3 * 784, torch.device('cpu'), torch.float32)['G']
    with torch.no_grad():  # a zero last layer: every noise gives its bias, through the sigmoid: the same image
        G.model[-2].weight.zero_()
        G.model[-2].bias.copy_(torch.logit(image.clamp(1e-4, 1 - 1e-4)))
    samples = pg.generate({'G': G}, torch.randn(1, 500, 10), None)[0]
    assert (samples - image).abs().max() < 1e-3
    metrics = pg.stacked_metrics(toy_classifier, samples, pg.feature_stats(torch.randn(100, 128)))
    assert metrics['modes'] == 1 and metrics['modes_captured'] == 1 and metrics['high_quality'] == 1
    assert metrics['kl'] == pytest.approx(math.log(1000)) and metrics['histogram'][357] == 1


def test_the_training_examples_channels_are_independent_draws_and_their_labels_say_which(tiny_mnist):
    stacked, labels = pg.stacked_mnist(tiny_mnist, n=50_000)
    digits, digit_labels = pg.load_images('mnist', tiny_mnist)
    assert stacked.shape == (50_000, 3 * 784) and stacked.dtype == torch.uint8
    channels, first = stacked[:3000].reshape(-1, 3, 784), labels[:3000]  # (3,000 examples: about 1,000 hits)
    found = [(channels[:, c, None] == digits[None, :100]).all(2) for c in range(3)]  # which of the first 100
    for c in range(3):  # a channel holding one of those digits has its label where labels say
        hit = found[c].any(1)
        assert hit.sum() > 500
        assert (digit_labels[found[c][hit].int().argmax(1)] == first[hit] // 10 ** (2 - c) % 10).all()
    counts = torch.bincount(labels, minlength=1000)  # 50 expected per triple: uniform, each digit its own draw
    assert len(counts) == 1000 and counts.min() > 15 and counts.max() < 95
    chi2 = ((counts - 50.0) ** 2 / 50).sum()
    assert chi2 < 1000 + 5 * math.sqrt(2 * 1000)
    d = torch.stack([labels // 100, labels // 10 % 10, labels % 10], 1).double()
    assert torch.corrcoef(d.T).sub(torch.eye(3)).abs().max() < 0.03  # the channels' digits are uncorrelated
    again, _ = pg.stacked_mnist(tiny_mnist, n=50_000)
    assert torch.equal(stacked, again)  # one fixed training set for every run


def test_held_out_examples_come_from_the_test_digits_only(tiny_mnist):
    held_out = pg.held_out_data({'dataset': 'stacked_mnist', 'data_root': tiny_mnist}, 300)[0].reshape(-1, 784)
    test_digits, _ = pg.load_images('mnist', tiny_mnist, train=False)
    train_digits, _ = pg.load_images('mnist', tiny_mnist)
    assert (held_out[:, None] == test_digits[None]).all(2).any(1).all()
    assert not (held_out[:, None] == train_digits[None]).all(2).any(1).any()


@REAL
def test_real_held_out_stacked_images_score_about_1000_modes_and_kl_near_0():
    images, labels = pg.load_images('mnist', SHARED_MNIST)
    classifier = pg.fit_classifier(images[:6000], labels[:6000], epochs=1, dev=torch.device('cpu'), batch_size=32)
    held_out = pg.stacked_mnist(SHARED_MNIST, n=10_000, train=False)[0]
    metrics = pg.stacked_metrics(classifier, held_out / 255, pg.feature_stats(torch.randn(1000, 128)))
    assert metrics['modes'] >= 995 and metrics['kl'] < 0.15 and metrics['modes_captured'] >= 950


def test_a_stacked_run_draws_colour_grids_evaluates_on_1000_modes_and_compares(tiny_mnist, tmp_path):
    out = tmp_path / 'runs' / 'a'
    done = run_script('--dataset=stacked_mnist', f'--data_root={tiny_mnist}', f'--out_dir={out}', '--iterations=21',
                      '--eval_at_end=True', '--eval_samples=300', '--h_dim=16', '--n_pairs=2', '--K=10',
                      '--sample_every=10', '--log_every=10', f'--classifier_dir={tmp_path / "cls"}', timeout=300)
    assert done.returncode == 0, done.stderr
    eval_line = next(line for line in done.stdout.splitlines() if line.startswith('eval'))
    assert ' of 1000 ' in eval_line and 'high-confidence modes ' in eval_line and 'KL ' in eval_line
    assert 'stacked_mnist training points' in done.stdout
    rows = pg.read_csv(out / 'metrics.csv')
    assert len(rows) == 2 and len(rows[0]['histogram'].split()) == 1000
    grid = pyplot_image(out / '002.png')
    assert grid.shape[2] >= 3 and (grid[..., 0] != grid[..., 1]).any()  # colour: the channels differ
    compared = run_script(f'--compare={tmp_path / "runs"}', f'--data_root={tiny_mnist}', '--eval_samples=200',
                          f'--classifier_dir={tmp_path / "cls"}', timeout=300)
    assert compared.returncode == 0, compared.stderr
    assert os.path.exists(tmp_path / 'runs' / 'compare_best.csv')
    best = pg.read_csv(tmp_path / 'runs' / 'compare_best.csv')[0]
    assert 0 <= int(best['modes']) <= 1000 and 0 <= int(best['modes_captured']) <= int(best['modes'])


def test_stacked_mnist_trains_on_128000_examples_and_evaluates_26000_samples_unless_told(tiny_mnist, tmp_path):
    cfg = pg.parse_args(['--dataset=stacked_mnist', f'--data_root={tiny_mnist}', f'--out_dir={tmp_path}',
                         '--iterations=1', '--h_dim=8'])
    assert cfg['eval_samples'] == 26_000 and pg.train(cfg) == 0  # the published protocol's, beside the block's 10,000
    assert torch.load(tmp_path / 'checkpoint.pt', weights_only=True)['hyperparameters']['eval_samples'] == 26_000
    assert len(pg.training_data(cfg)[0]) == 128_000
    told = pg.parse_args(['--dataset=stacked_mnist', f'--data_root={tiny_mnist}', f'--out_dir={tmp_path / "b"}',
                          '--iterations=1', '--h_dim=8', '--eval_samples=500'])
    assert pg.train(told) == 0 and told['eval_samples'] == 500


def pyplot_image(path):
    import matplotlib.image
    return matplotlib.image.imread(str(path))


def channel_classifier():
    """A stand-in for the MNIST classifier whose class logits are an image's first 10 pixels: a channel's digit and
    its probability are then set by hand."""
    first_ten = torch.nn.Linear(784, 10, bias=False)
    with torch.no_grad():
        first_ten.weight.copy_(torch.eye(10, 784))
    return torch.nn.Sequential(first_ten, torch.nn.Identity())


def stacked_sample(digits, probabilities):
    """A Stacked MNIST sample (3 * 784) whose channel c the stand-in reads as digits[c] with probabilities[c]."""
    channels = torch.zeros(3, 784)
    for c, (d, p) in enumerate(zip(digits, probabilities)):
        channels[c, d] = math.log(9 * p / (1 - p))  # softmax over that logit and nine zeros: p
    return channels.reshape(-1)


def test_one_sample_of_a_triple_makes_it_a_mode_as_published():
    samples = torch.stack([stacked_sample((1, 2, 3), (0.99,) * 3)] * 9 + [stacked_sample((4, 5, 6), (0.99,) * 3)])
    metrics = pg.stacked_metrics(channel_classifier(), samples, pg.feature_stats(torch.randn(100, 10)))
    assert metrics['modes'] == 2 and metrics['modes_captured'] == 2  # (4, 5, 6): one sample of ten
    assert metrics['histogram'][456] == pytest.approx(0.1) and metrics['histogram'][123] == pytest.approx(0.9)


def test_a_sample_is_confident_only_where_its_weakest_channel_reaches_0_9():
    samples = torch.stack([stacked_sample((1, 2, 3), (0.95, 0.95, 0.95)), stacked_sample((4, 5, 6), (0.95, 0.95, 0.89)),
                           stacked_sample((7, 8, 9), (0.95, 0.95, 0.91)), stacked_sample((1, 2, 3), (0.5, 0.5, 0.5))])
    metrics = pg.stacked_metrics(channel_classifier(), samples, pg.feature_stats(torch.randn(100, 10)))
    assert metrics['modes'] == 3  # every triple its digits, however unsure
    assert metrics['modes_captured'] == 2 and metrics['high_quality'] == 0.5  # (1, 2, 3) and (7, 8, 9), once each
