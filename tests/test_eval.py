"""The evaluation: metrics on data with known answers, cross-scoring, outputs, the 2-D data, the classifier cache."""
import csv
import math
import os

import pytest
import torch

import parallel_gan as pg
from conftest import SHARED_MNIST, edited_copy, make_mnist, toy_digits


@pytest.fixture(scope='module')
def toy_classifier():
    images, labels = toy_digits(400, seed=1)
    return pg.fit_classifier(images.reshape(len(images), -1), labels, epochs=3, dev=torch.device("cpu"), batch_size=16)


def scored(classifier, images):
    return pg.classify(classifier, images.reshape(len(images), -1) / 255)


def test_real_images_score_every_mode_and_nothing_against_themselves(toy_classifier):
    images, labels = toy_digits(500, seed=2)
    probs, features = scored(toy_classifier, images)
    assert (probs.argmax(1) == labels).float().mean() > 0.98
    metrics = pg.image_metrics(probs, features, pg.feature_stats(features))
    assert metrics['modes'] == 10 and metrics['kl'] < 0.01 and abs(metrics['fd']) < 1e-3
    assert metrics['score'] > 9 and metrics['confidence'] > 0.9
    assert sum(metrics['histogram']) == pytest.approx(1)


def test_samples_of_one_class_cover_one_mode_and_sit_far_from_the_data(toy_classifier):
    images, labels = toy_digits(500, seed=2)
    test_stats = pg.feature_stats(scored(toy_classifier, images)[1])
    threes = images[labels == 3]
    metrics = pg.image_metrics(*scored(toy_classifier, threes), test_stats)
    assert metrics['modes'] == 1 and metrics['kl'] == pytest.approx(math.log(10), abs=0.05)
    assert metrics['score'] == pytest.approx(1, abs=0.1) and metrics['fd'] > 1


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_MNIST, 'MNIST', 'raw')), reason='real MNIST not present')
def test_real_mnist_test_images_score_10_modes_kl_0_and_fd_0_against_themselves():
    images, labels = pg.load_images('mnist', SHARED_MNIST)
    classifier = pg.fit_classifier(images[:3000], labels[:3000], epochs=1, dev=torch.device('cpu'), batch_size=32)
    test_images, _ = pg.load_images('mnist', SHARED_MNIST, train=False)
    probs, features = pg.classify(classifier, test_images / 255)
    metrics = pg.image_metrics(probs, features, pg.feature_stats(features))
    assert metrics['modes'] == 10 and metrics['kl'] < 0.05 and abs(metrics['fd']) < 1e-3


def test_frechet_distance_of_two_gaussians_matches_the_closed_form():
    mean_a, mean_b = torch.zeros(3, dtype=torch.float64), torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    cov_a, cov_b = torch.diag(torch.tensor([1.0, 4.0, 9.0])).double(), torch.diag(torch.tensor([4.0, 1.0, 9.0])).double()
    # |mu_a - mu_b|^2 = 5; traces 14 + 14; sqrt of the product's eigenvalues: 2 + 2 + 9
    assert pg.frechet_distance((mean_a, cov_a), (mean_b, cov_b)) == pytest.approx(5 + 28 - 2 * 13)


@pytest.mark.parametrize('dataset, modes, std, spot', [('ring8', 8, 0.02, (0.0, 2.0)), ('grid25', 25, 0.05, (-4.0, 2.0))])
def test_two_d_datasets_are_the_literatures_mixtures_in_their_own_coordinates(dataset, modes, std, spot):
    points, labels = pg.sample_mixture(dataset, 5000, seed=0)
    centres, sigma = pg.mixture(dataset)
    assert points.shape == (5000, 2) and points.dtype == torch.float32 and len(centres) == modes and sigma == std
    assert any(torch.allclose(c, torch.tensor(spot), atol=1e-6) for c in centres)
    assert (points - centres[labels]).std().item() == pytest.approx(std, rel=0.05)
    assert set(labels.tolist()) == set(range(modes))


@pytest.mark.parametrize('dataset', ['ring8', 'grid25'])
def test_a_generator_on_every_centre_covers_every_mode_and_one_on_a_single_centre_covers_one(dataset):
    centres, _ = pg.mixture(dataset)
    real = pg.feature_stats(pg.sample_mixture(dataset, 5000, seed=1)[0])
    everywhere = centres.repeat(40, 1)
    metrics = pg.mixture_metrics(everywhere, dataset, real)
    assert metrics['modes'] == metrics['modes_captured'] == len(centres)
    assert metrics['high_quality'] == 1 and metrics['kl'] < 1e-9
    one = centres[:1].repeat(400, 1)
    metrics = pg.mixture_metrics(one, dataset, real)
    assert metrics['modes'] == metrics['modes_captured'] == 1 and metrics['kl'] == pytest.approx(math.log(len(centres)))
    astray = torch.full((400, 2), 7.0)
    assert pg.mixture_metrics(astray, dataset, real)['high_quality'] == 0


def test_high_quality_and_modes_captured_on_points_placed_by_hand():
    """ring8 (std 0.02): a sample counts as high quality within 3 std = 0.06 of its nearest mode."""
    centres, _ = pg.mixture('ring8')
    real = pg.feature_stats(pg.sample_mixture('ring8', 2000, seed=1)[0])
    points = torch.cat([centres[0] + torch.tensor([0.059, 0.0]).repeat(6, 1),  # 6 close to mode 0
                        (centres[1] + torch.tensor([0.0, 0.061]))[None],          # 1 just too far from mode 1
                        centres[2][None],                                         # 1 on mode 2
                        torch.zeros(2, 2)])                                       # 2 at the centre: no mode near
    metrics = pg.mixture_metrics(points, 'ring8', real)
    assert metrics['high_quality'] == pytest.approx(7 / 10)
    assert metrics['modes_captured'] == 2  # mode 0 and mode 2, one sample is enough
    assert metrics['modes'] == 2  # a third of the fair share of 10 samples over 8 modes is 0.42: one sample covers
    assert metrics['histogram'][:3] == pytest.approx([0.6, 0.0, 0.1])


def test_coverage_counts_a_mode_from_a_third_of_its_fair_share():
    """10 modes, 3000 samples: the fair share is 300, a third of it 100; a half (150) would not count 120."""
    counts = torch.tensor([120, 99, 100, 2681, 0, 0, 0, 0, 0, 0])
    covered, kl = pg.coverage(counts, 3000)
    assert covered == 3
    share = counts.double() / 3000
    nonzero = share[share > 0]
    assert kl == pytest.approx(float((nonzero * (nonzero * 10).log()).sum()))


def test_cross_scores_hold_every_discriminator_on_every_generator():
    cfg = pg.parse_args(['--n_pairs=3', '--dataset=ring8'])
    pairs = pg.make_pairs(cfg, 2, torch.device('cpu'), torch.float32)
    D = pairs['D']
    with torch.no_grad():  # discriminator d says sigmoid(d - 1) to everything; generator g's samples don't matter
        D.model[2].weight.zero_()
        D.model[2].bias.copy_(torch.arange(3.0).reshape(3, 1, 1) - 1)
    samples = torch.rand(3, 50, 2)
    scores = pg.cross_scores(pairs, samples, None)
    assert scores.shape == (3, 3)
    assert torch.allclose(scores, torch.sigmoid(torch.arange(3.0) - 1).double()[:, None].expand(3, 3), atol=1e-6)

    cfg = pg.parse_args(['--n_pairs=3', '--dataset=ring8', '--eval_samples=200'])
    evaluator = pg.Evaluator(cfg, torch.device('cpu'), torch.float32, *pg.training_data(cfg))
    D.origin = [2, 0, 1]  # slot 0 holds discriminator 3, slot 1 D1, slot 2 D2
    rows = evaluator(pairs, 10)
    assert [r['generator'] for r in rows] == [1, 2, 3]
    expected = torch.sigmoid(torch.tensor([0.0, 1.0, -1.0])).tolist()  # D1, D2, D3 in that order
    assert rows[0]['d_scores'] == pytest.approx(expected, abs=1e-6)
    assert rows[0]['pool_worst'] == pytest.approx(min(expected), abs=1e-6)
    assert rows[0]['pool_mean'] == pytest.approx(sum(expected) / 3, abs=1e-6)


def test_a_run_writes_metrics_csv_and_png_and_logs_a_summary(tiny_mnist, tmp_path, capsys):
    out = tmp_path / 'out'
    cfg = pg.parse_args([f'--data_root={tiny_mnist}', f'--out_dir={out}', f'--classifier_dir={tmp_path / "cls"}',
                         '--iterations=31', '--eval_every=15', '--eval_samples=300', '--h_dim=32', '--log_every=10'])
    assert pg.train(cfg) == 0
    log = capsys.readouterr().out
    assert 'accuracy on the 100 test images' in log
    assert [line.split()[1] for line in log.splitlines() if line.startswith('eval')] == ['15', '30']
    rows = pg.read_csv(out / 'metrics.csv')
    assert [(int(r['iteration']), int(r['generator'])) for r in rows] == [(15, 1), (15, 2), (30, 1), (30, 2)]
    for row in rows:
        assert 0 <= int(row['modes']) <= 10 and float(row['fd']) >= 0 and 1 <= float(row['score']) <= 10
        assert len(row['histogram'].split()) == 10 and len(row['d_scores'].split()) == 2
    assert (out / 'metrics.png').stat().st_size > 1000

    # a resume redoes the evaluations after its checkpoint, without duplicating rows
    os.remove(out / 'checkpoint.pt')
    pg.train(pg.parse_args([*[f'--{k}={v}' for k, v in cfg.items() if k not in ('iterations', 'resume')],
                            '--iterations=20', '--sample_every=20']))
    pg.train(pg.parse_args([*[f'--{k}={v}' for k, v in cfg.items() if k not in ('iterations', 'resume')],
                            '--iterations=31', '--resume=True']))
    assert [int(r['iteration']) for r in pg.read_csv(out / 'metrics.csv')] == [15, 15, 19, 19, 30, 30]


R15_CENTRE = (10.0, 9.96)  # where R15's own coordinates put the centre that mixture('r15') puts at the origin


CONDITIONAL_D = (  # a conditional GAN's discriminator: the sample and its label, one-hot, side by side
    ("for fan_in in [x_dim * cfg['pack']] + [h]", "for fan_in in [(x_dim + 10) * cfg['pack']] + [h]"),
    ("    real_logit = D.model(noisy(x, input_noise[0]))",
     "    label = F.one_hot(y.long(), 10).to(x.dtype)\n"
     "    real_logit = D.model(torch.cat([noisy(x, input_noise[0]), label], -1))"),
    ("fake_logit = D.model(noisy(fake.detach(), input_noise[1]))",
     "fake_logit = D.model(torch.cat([noisy(fake.detach(), input_noise[1]), label.expand(len(fake), -1, -1)], -1))"),
    ("G_loss = g_loss(D.model(noisy(fake, input_noise[2])))",
     "G_loss = g_loss(D.model(torch.cat([noisy(fake, input_noise[2]), label.expand(len(fake), -1, -1)], -1)))"))


def test_a_conditional_gan_edit_trains_and_evaluates_what_it_still_can(tiny_mnist, tmp_path, capsys):
    """Its discriminators take x_dim + 10 inputs, which the evaluation's plain samples and real data are not: the
    run goes on, says once per evaluation part what it cannot measure, and still writes the generators' metrics."""
    module, _ = edited_copy(tmp_path, *CONDITIONAL_D)
    out = tmp_path / 'out'
    status = module.train(module.parse_args([
        f'--data_root={tiny_mnist}', f'--out_dir={out}', f'--classifier_dir={tiny_mnist}/cls', '--h_dim=16',
        '--iterations=12', '--eval_every=10', '--eval_at_end=True', '--eval_samples=200', '--log_every=5']))
    assert status == 0
    captured = capsys.readouterr()
    assert 'Traceback' not in captured.out + captured.err
    cannot = [line for line in captured.out.splitlines() if line.startswith('cannot ')]
    assert cannot and all(line.startswith('cannot measure ') for line in cannot)
    assert len(cannot) == len(set(cannot))  # each said once, not at every evaluation
    assert any('pool of discriminators' in line for line in cannot)
    assert all('(edit score_inputs() to give the networks what they take)' in line for line in cannot
               if 'discriminators' in line)
    assert any('discriminators on real data' in line for line in cannot)
    rows = pg.read_csv(out / 'metrics.csv')
    assert [(int(r['iteration']), int(r['generator'])) for r in rows] == [(10, 1), (10, 2), (11, 1), (11, 2)]
    for row in rows:  # the generators' own metrics are there; what needs a discriminator is not
        assert 0 <= int(row['modes']) <= 10 and math.isfinite(float(row['fd'])) and len(row['histogram'].split()) == 10
        assert math.isnan(float(row['pool_mean'])) and math.isnan(float(row['d_train']))
    assert (out / 'metrics.png').stat().st_size > 1000 and (out / 'checkpoint.pt').exists()


WITH_LABEL = (  # the README's recipe: the label beside each input, one-hot
    "def with_label(t, y):\n"
    "    \"\"\"t (1 or n_pairs, batch, features) with each row's label (1 or n_pairs, batch), one-hot, beside it.\"\"\"\n"
    "    label = F.one_hot(y.long(), 10).to(t.dtype)\n"
    "    n = max(len(t), len(label))\n"
    "    return torch.cat([t.expand(n, -1, -1), label.expand(n, -1, -1)], -1)\n\n\n")
CONDITIONAL_GAN = (  # the README's recipe: G and D both take the label, in training and in draw_samples/score_inputs
    ("for fan_in in [cfg['z_dim']] + [h]", "for fan_in in [cfg['z_dim'] + 10] + [h]"),
    ("for fan_in in [x_dim * cfg['pack']] + [h]", "for fan_in in [(x_dim + 10) * cfg['pack']] + [h]"),
    ("    fake = G.model(z)", "    fake = G.model(with_label(z, y))"),
    ("D.model(noisy(x, input_noise[0]))", "D.model(with_label(noisy(x, input_noise[0]), y))"),
    ("D.model(noisy(fake.detach(), input_noise[1]))", "D.model(with_label(noisy(fake.detach(), input_noise[1]), y))"),
    ("D.model(noisy(fake, input_noise[2]))", "D.model(with_label(noisy(fake, input_noise[2]), y))"),
    ("def draw_samples(pairs, z, y):", WITH_LABEL + "def draw_samples(pairs, z, y):"),
    ("    return pairs['G'].model(z)", "    return pairs['G'].model(with_label(z, y))"),
    ("    return D(x).repeat_interleave", "    return D(with_label(x, y)).repeat_interleave"))


@pytest.mark.parametrize('own_noise, pack', [(False, 1), (True, 2)])
def test_the_conditional_gan_recipe_trains_resumes_draws_its_grids_and_is_measured(tiny_mnist, tmp_path, capsys,
                                                                                   monkeypatch, own_noise, pack):
    """G and D conditioned on the batch's labels (shared, or each pair's own batch; D judging single samples or
    PacGAN's packs of two): it trains and resumes; the sample grids (a class per row, labelled) and every
    evaluation column come through draw_samples and score_inputs. An unconditional run's grids have no row labels."""
    module, _ = edited_copy(tmp_path, *CONDITIONAL_GAN)
    labels = []
    grid = module.save_samples
    monkeypatch.setattr(module, 'save_samples', lambda *args: labels.append(args[-1]) or grid(*args))
    out = tmp_path / 'out'
    common = [f'--data_root={tiny_mnist}', f'--out_dir={out}', f'--classifier_dir={tiny_mnist}/cls',
              '--h_dim=16', '--eval_every=10', '--eval_samples=200', '--log_every=5', '--sample_every=5',
              f'--own_noise={own_noise}', f'--pack={pack}']
    assert module.train(module.parse_args([*common, '--iterations=11'])) == 0
    assert labels == [[0, 1, 2, 3]] * 3
    assert module.train(module.parse_args([*common, '--iterations=16', '--resume=True'])) == 0
    printed = capsys.readouterr().out
    assert 'it      15 | D_loss' in printed and 'Traceback' not in printed and 'cannot' not in printed
    assert sorted(p.name for p in out.glob('*.png') if p.stem.isdigit()) == ['000.png', '001.png', '002.png', '003.png']
    rows = pg.read_csv(out / 'metrics.csv')
    assert [int(r['iteration']) for r in rows] == [10, 10, 15, 15]
    for row in rows:
        for key in ('modes', 'kl', 'fd', 'pool_mean', 'd_train', 'd_heldout', 'd_gap'):
            assert math.isfinite(float(row[key])), key
    recorder = module.Recorder(module.parse_args([*common, '--iterations=1']), torch.device('cpu'),
                               *module.training_data(module.parse_args(common)), None, [])
    assert recorder.fixed_y.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]]  # a class per grid row
    monkeypatch.setattr(pg, 'save_samples', lambda *args: labels.append(args[-1]) or grid(*args))
    assert pg.train(pg.parse_args([*common[:2], '--h_dim=16', '--iterations=2', f'--out_dir={tmp_path / "plain"}',
                                   '--eval_every=0'])) == 0
    assert labels[-1] is None


def test_the_classifier_cache_is_reused_and_rebuilt_when_stale(tmp_path, monkeypatch, capsys):
    root = make_mnist(tmp_path / 'data', train=200, test=50)
    cfg = pg.parse_args([f'--data_root={root}', f'--classifier_dir={tmp_path / "cls"}'])
    fits = []
    real_fit = pg.fit_classifier
    monkeypatch.setattr(pg, 'fit_classifier', lambda *a, **k: fits.append(1) or real_fit(*a, **k))
    dev = torch.device('cpu')
    first, _ = pg.load_classifier(cfg, dev, *pg.training_data(cfg))
    again, _ = pg.load_classifier(cfg, dev, *pg.training_data(cfg))
    assert len(fits) == 1 and 'cached in' in capsys.readouterr().out
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))

    make_mnist(tmp_path / 'data', train=250, test=50)  # the data changed: the cache no longer matches
    pg.load_classifier(cfg, dev, *pg.training_data(cfg))
    assert len(fits) == 2

    (tmp_path / 'cls' / 'mnist.pt').write_bytes(b'garbage')
    pg.load_classifier(cfg, dev, *pg.training_data(cfg))
    assert len(fits) == 3


def test_an_unwritable_classifier_folder_still_works(tmp_path, capsys):
    root = make_mnist(tmp_path / 'data', train=200, test=50)
    blocker = tmp_path / 'file'
    blocker.write_text('not a folder')
    cfg = pg.parse_args([f'--data_root={root}', f'--classifier_dir={blocker / "cls"}'])
    model, stats = pg.load_classifier(cfg, torch.device('cpu'), *pg.training_data(cfg))
    assert 'not cached' in capsys.readouterr().out and stats[1].shape == (128, 128)


def test_fashion_mnist_loads_from_its_own_folder(tmp_path):
    root = make_mnist(tmp_path, train=120, test=30, kind='FashionMNIST')
    images, labels = pg.load_images('fashion_mnist', root)
    assert images.shape == (120, 784) and images.dtype == torch.uint8 and len(labels) == 120


R15_CSV = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '..', 'shared', 'r15', 'R15.csv')


@pytest.mark.skipif(not os.path.exists(R15_CSV), reason='no ../shared/r15/R15.csv')
def test_the_r15_mixture_has_the_real_r15_clusters_means():
    """Each of r15's 15 means lies within 0.15 of the mean of one of the real data set's 15 clusters, one each."""
    with open(R15_CSV) as f:
        rows = list(csv.DictReader(f))
    points = torch.tensor([[float(r['x']), float(r['y'])] for r in rows], dtype=torch.float64)
    cluster = torch.tensor([int(r['cluster']) for r in rows])
    real = torch.stack([points[cluster == c].mean(0) for c in range(1, 16)])
    ours, std = pg.mixture('r15')
    assert ours.mean(0).abs().max() < 1e-6  # centred at the origin; R15's own coordinates put it at R15_CENTRE
    distance = torch.cdist(ours.double() + torch.tensor(R15_CENTRE, dtype=torch.float64), real)
    assert distance.min(1).values.max() < 0.15
    assert sorted(distance.argmin(1).tolist()) == list(range(15))  # every real cluster matched once
    assert std == pytest.approx(0.3)
    points, modes = pg.sample_mixture('r15', 15_000, seed=0)
    assert torch.bincount(modes).min() > 800 and (points - ours[modes]).std().item() == pytest.approx(0.3, abs=0.01)


def test_a_discriminators_accuracy_is_the_share_it_takes_for_real_at_one_half():
    """judge_real: mean D(x) and the share with D(x) > 0.5; logits placed just either side of 0.5 and of 0.4."""
    cfg = pg.parse_args(['--n_pairs=2', '--dataset=ring8'])
    pairs = pg.make_pairs(cfg, 2, torch.device('cpu'), torch.float32)
    D = pairs['D']
    logit = torch.logit(torch.tensor([0.45, 0.55, 0.35, 0.62]))
    with torch.no_grad():  # D's output is its input's first coordinate: the points carry the logits
        D.model[0].weight.zero_()
        D.model[0].weight[:, 0, 0] = 1
        D.model[0].bias.fill_(10)  # through the ReLU unchanged, shifted by 10 ...
        D.model[2].weight.zero_()
        D.model[2].weight[:, 0, 0] = 1
        D.model[2].bias.fill_(-10)  # ... and back
    points = torch.stack([logit, torch.zeros(4)], 1)
    mean, accuracy = pg.judge_real(pairs, points, torch.zeros(4))
    assert accuracy.tolist() == [0.5, 0.5]  # 0.55 and 0.62 are taken for real; 0.45 (and 0.35) not
    assert mean.tolist() == pytest.approx([float(torch.sigmoid(logit).mean())] * 2, abs=1e-6)


def test_the_classifier_is_the_same_bits_whatever_threads_the_run_uses():
    """The classifier (cached once, shared by every run of a study) trains on CLASSIFIER_THREADS threads: a run with
    --threads=1 and one with 2 get the same weights, and the run's own thread count is left as it was."""
    images, labels = toy_digits(600, seed=1)
    before, weights = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            weights.append(pg.fit_classifier(images.reshape(600, -1), labels, 1, torch.device('cpu')).state_dict())
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
