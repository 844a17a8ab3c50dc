"""The pictures a run writes read at a glance: large sample digits, visible metrics, losses of a long run."""
import numpy as np
import pytest
import torch
from PIL import Image

import parallel_gan as pg


def runs(line):
    """Lengths of the runs of True in a 1-D boolean array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], line.astype(int), [0]])))
    return edges[1::2] - edges[::2]


@pytest.mark.parametrize('n', [1, 2, 5])
def test_sample_digits_are_drawn_large_with_little_margin(tmp_path, n):
    """Black digits (all zeros) on the white grid: each at least 70 pixels a side (twice the 35 of the first
    layout), and, for a single row of generators, digits cover most of the picture."""
    pg.save_samples(str(tmp_path / 's.png'), torch.zeros(n, 16, 784), 1000, list(range(n))[::-1])
    dark = np.asarray(Image.open(tmp_path / 's.png').convert('L')) < 60
    for image in (dark, dark.T):
        lengths = np.concatenate([runs(line) for line in image])
        digits = lengths[lengths >= 20]  # not the letters of the titles
        assert len(digits) and digits.min() >= 70 and np.median(digits) == digits.min()
    if n <= 4:
        assert dark.mean() >= 0.6


def test_a_single_evaluation_is_plain_to_see_in_every_panel(monkeypatch):
    figures = []
    monkeypatch.setattr(pg, 'save_figure', lambda fig, path: figures.append(fig))
    rows = [{'iteration': '2999', 'generator': str(g), 'modes': str(8 + g), 'kl': str(0.1 * g), 'fd': str(20 * g),
             'd_train': str(0.6 + 0.1 * g), 'd_heldout': str(0.5 + 0.02 * g)} for g in (1, 2)]
    pg.save_metrics_plot('unused.png', rows)
    fig = figures[0]
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
    blue = np.abs(pixels - [31, 119, 180]).sum(-1) < 60  # G1's colour, C0
    for ax in fig.axes:
        box = ax.get_window_extent()
        inside = blue[int(len(blue) - box.y1):int(len(blue) - box.y0), int(box.x0):int(box.x1)].copy()
        if ax.get_legend():  # not its sample line and marker
            legend = ax.get_legend().get_window_extent()
            inside[int(box.y1 - legend.y1):int(box.y1 - legend.y0), int(legend.x0 - box.x0):int(legend.x1 - box.x0)] = False
        assert inside.sum() >= 40, ax.get_title()  # a marker several pixels across, not a dot


def history(n, spike=None):
    """n log lines over 1,000,000 iterations of two pairs, as a run's log keeps them ({'iteration': it, name: each
    pair's mean}): D_loss falling from 1.4 to 0.6, G_loss rising from 0.6 to 1.4, with noise; optionally a G_loss
    spike of 500 (pair 1) a third of the way in."""
    g = torch.Generator().manual_seed(0)
    trend = torch.linspace(1.4, 0.6, n, dtype=torch.float64)[:, None]
    stats = torch.zeros(n, 2, 4, dtype=torch.float64)
    stats[:, :, 0] = trend + 0.3 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    stats[:, :, 1] = 2 - trend + 0.5 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    if spike:
        stats[n // 3, 0, 1] = spike
    its = torch.arange(n) * (1_000_000 // n) + 1_000_000 // n - 1
    names = ('D_loss', 'G_loss', 'D(x)', 'D(G(z))')
    return [{'iteration': it, **dict(zip(names, row))} for it, row in zip(its.tolist(), stats.transpose(1, 2).tolist())]


def drawn_losses(monkeypatch, rows):
    figures = []
    monkeypatch.setattr(pg, 'save_figure', lambda fig, path: figures.append(fig))
    pg.save_losses('unused.png', rows, list(range(100, 1_000_000, 100)))
    return figures[0].axes


def test_the_losses_of_a_million_iterations_stay_readable(monkeypatch):
    """Logged every 1000 iterations (1,000 lines): per pair a bold smoothed curve that follows the trend through
    the noise, and the y range of the bulk of the points, not of a lone spike (counted off the scale)."""
    axes = drawn_losses(monkeypatch, history(1000, spike=500))
    for ax, (start, end) in zip(axes, ((1.4, 0.6), (0.6, 1.4))):
        bold = [line for line in ax.get_lines() if line.get_linewidth() > 1]
        assert sorted(line.get_label() for line in bold) == ['pair 1', 'pair 2']
        for line in bold:
            y = line.get_ydata()
            assert abs(y[:10].mean() - start) < 0.15 and abs(y[-10:].mean() - end) < 0.15
        low, high = ax.get_ylim()
        assert high < 5 and low > -1.5
    assert axes[1].get_ylabel().startswith('G_loss (') and 'off the scale' in axes[1].get_ylabel()


def test_the_losses_of_a_million_iterations_logged_often_stay_light_and_span_the_run(monkeypatch, tmp_path):
    """Logged every 10 iterations (100,000 lines): every curve has at most 2,000 points (means of consecutive
    lines) and still spans the run (a centred moving median over 2% of the points, all but its first and last
    1%); the PNG is written at its size."""
    figures, save = [], pg.save_figure
    monkeypatch.setattr(pg, 'save_figure', lambda fig, path: figures.append(fig) or save(fig, path))
    pg.save_losses(str(tmp_path / 'losses.png'), history(100_000), list(range(100, 1_000_000, 100)))
    for ax in figures[0].axes:
        for line in ax.get_lines():
            x = line.get_xdata()
            assert len(x) <= 2000 and x[0] < 20_000 and x[-1] > 980_000
    assert Image.open(tmp_path / 'losses.png').size == (720, 480)
