"""
Generative Adversarial Parallelization (GAP; Im, Ma, Kim & Taylor, arXiv:1612.04021), after wiseodd's
gap_pytorch.py: several GANs train side by side, and every K iterations their discriminators change partners.
K=0 never swaps: independent GANs, the baseline. `python parallel_gan.py --help` lists the hyperparameters;
`--paper=True` sets the paper's conditions, `--compare=DIR` judges runs by one pool of discriminators, and
`torchrun --nproc_per_node=2 parallel_gan.py` trains one pair per process. Writes out/NNN.png, out/losses.png,
out/metrics.csv, out/metrics.png and out/checkpoint.pt (--resume=True). Top to bottom: the hyperparameters,
networks, losses, step, swap, one iteration, the training loop, and the samples and scores that the pictures,
the evaluation and --compare take; below one divider, the support.
"""
import ast
import csv
import glob
import math
import os
import re
import signal
import sys
import time
import zlib
from contextlib import contextmanager, nullcontext, redirect_stderr, redirect_stdout, suppress
from io import StringIO

try:
    import fcntl  # locks out_dir against a second run (not on Windows)
except ImportError:
    fcntl = None

import torch
import torch.nn.functional as F
from torch import nn

# --- hyperparameters (override any of them as --name=value) -------------------------
# networks
z_dim = 10  # noise dimensions fed to each generator
h_dim = 128  # hidden units of every generator and discriminator
layers = 1  # hidden layers of every generator and discriminator (the reference: 1)
pack = 1  # PacGAN: each D judges packs of this many samples side by side, mb_size/pack packs a step (1: off)
# GAP
n_pairs = 2  # generator/discriminator pairs trained side by side
K = 100  # the discriminators change partners every K iterations (0: never, independent GANs)
# training
mb_size = 32  # minibatch size
lr = 1e-3  # learning rate of every network (its optimiser: Adam, in make_pairs)
beta1 = 0.9  # Adam's first-moment decay (torch's default, the reference's; GAN papers often use 0.5)
iterations = 1_000_000  # training iterations
seed = 0  # seeds the weights, the noise, the data order and the pairings
# the paper's training conditions (section 4.1 and Algorithm 1); off, every pair sees the same noise and batch
paper = False  # set the six below as the paper does (values given on the command line win)
own_noise = False  # each pair its own noise and minibatch order (each example still once per epoch)
prior = 'gaussian'  # the noise: 'gaussian', 'uniform' on [-1, 1], 'mixed' (first half of the pairs Gaussian)
input_noise = 0.0  # std of Gaussian noise on every D input in training, decaying linearly to 0 (paper: 0.1)
clip = 0.0  # clip each network's gradient to this norm before its step (0: never; paper: 1)
swap = 'derangement'  # 'derangement' (every D moves) or 'matching' (Algorithm 1: random pairs exchange theirs)
batch_norm = False  # batch normalisation after every hidden linear layer of G and D (the paper's toy networks)
# the authors' code (hma02/GAN-evaluation): two choices the paper does not state (its third, a swap every 10% of
# training, is K = iterations / 10)
same_init = False  # every pair starts from pair 1's weights, G and D (needs pairs that differ: own_noise, ...)
swap_moves = 'network'  # a swap moves 'network' (weights, buffers, Adam's state) or 'weights' (state stays put)
# output
log_every = 1000  # print a log line (means since the previous one) every this many iterations
sample_every = 1000  # write out/NNN.png and the checkpoint every this many iterations
out_dir = 'out'  # where samples, plots and the checkpoint go
resume = False  # continue from out_dir/checkpoint.pt exactly where it stopped
resume_edited = False  # resume also when the algorithm's code differs from the run's
# data
dataset = 'mnist'  # 'mnist', 'fashion_mnist', 'stacked_mnist' (1,000 modes), or 2-D mixtures 'ring8', 'grid25', 'r15'
data_root = 'out/data'  # MNIST lives in data_root/MNIST/raw, Fashion-MNIST in data_root/FashionMNIST/raw
train_size = 0  # train on only the first this many training examples (0: all of them)
# evaluation: mode coverage and sample quality, GAP against no-swap
eval_every = 10_000  # evaluate every this many iterations, and at the end of a run that reached one (0: never)
eval_at_end = False  # evaluate at the end also a run shorter than eval_every
eval_samples = 10_000  # samples per generator in each evaluation (stacked_mnist: 26,000 unless given, as published)
classifier_dir = 'out/classifiers'  # where the classifier that scores image samples is cached
compare = ''  # a folder of runs: score every generator with every run's discriminators, train nothing
# system
device = 'auto'  # 'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'
dtype = 'float32'  # 'float32' or 'float64' for every weight and computation
threads = 0  # CPU threads torch may use (0: torch's default)
# --- end of hyperparameters ---------------------------------------------------------

PAPER = {'own_noise': True, 'prior': 'mixed', 'input_noise': 0.1, 'clip': 1.0, 'swap': 'matching',
         'batch_norm': True}  # what paper=True sets (clip 1: the authors' code, hma02/GAN-evaluation)
# What the data are: image pixels in PIXELS, made by the generators' output layer IMAGE_OUTPUT (for [-1, 1]:
# nn.Tanh, (-1.0, 1.0)); the 2-D mixtures are points in their own coordinates, made by a linear output.
IMAGE_OUTPUT, PIXELS = nn.Sigmoid, (0.0, 1.0)
MIXTURES = ('ring8', 'grid25', 'r15')


# ------------------------------------------------------------------------------------
# the networks: each side's networks are one module whose every weight has a leading pairs dimension, so every
# pair runs in the same batched product (activations: (n_pairs, batch, features)). Edit generator() and
# discriminator() as you would an nn.Sequential; PerPair (support part) makes any torch module per pair.

class Linear(nn.Module):
    """n independent nn.Linear(fan_in, fan_out), initialised as nn.Linear is: weight (n, fan_in, fan_out)."""

    def __init__(self, n, fan_in, fan_out):
        super().__init__()
        bound = 1 / math.sqrt(fan_in)
        self.weight = nn.Parameter(torch.empty(n, fan_in, fan_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, 1, fan_out).uniform_(-bound, bound))

    def forward(self, x):
        return torch.baddbmm(self.bias, x, self.weight)


class SpectralLinear(Linear):
    """Linear with each pair's weight divided by its largest singular value, estimated as torch's spectral_norm
    does (one power iteration per training pass); u and v are per-pair buffers, which a swap moves along."""

    def __init__(self, n, fan_in, fan_out, eps=1e-12):
        super().__init__(n, fan_in, fan_out)
        self.eps = eps
        self.register_buffer('u', F.normalize(torch.randn(n, 1, fan_out), dim=-1, eps=eps))
        self.register_buffer('v', F.normalize(self.u @ self.weight.detach().transpose(1, 2), dim=-1, eps=eps))

    def forward(self, x):
        if self.training:
            with torch.no_grad():  # pair i computes x @ W[i]: W[i] maps u's space to v's by its transpose
                self.v.copy_(F.normalize(self.u @ self.weight.transpose(1, 2), dim=-1, eps=self.eps))
                self.u.copy_(F.normalize(self.v @ self.weight, dim=-1, eps=self.eps))
        u, v = self.u.clone(), self.v.clone()  # as saved for backward: a later pass updates the buffers
        sigma = v @ self.weight @ u.transpose(1, 2)  # (n, 1, 1)
        return torch.baddbmm(self.bias, x, self.weight / sigma)


class BatchNorm(nn.Module):
    """n independent nn.BatchNorm1d(features, track_running_stats=False): each pair normalises over its own batch,
    in training and evaluation alike (running statistics would mix D's real and fake batches)."""

    def __init__(self, n, features, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n, 1, features))
        self.bias = nn.Parameter(torch.zeros(n, 1, features))

    def forward(self, x):
        n, batch, features = x.shape  # every pair's features side by side: one torch batch_norm
        side_by_side = x.transpose(0, 1).reshape(batch, n * features)
        out = F.batch_norm(side_by_side, None, None, self.weight.view(-1), self.bias.view(-1), True, 0.0, self.eps)
        return out.reshape(batch, n, features).transpose(0, 1)


class Pack(nn.Module):
    """PacGAN's packing (Lin et al. 2018): (n, batch, features) -> (n, batch / m, m * features), each row m
    consecutive samples side by side, so that a discriminator judges m samples at once."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        n, batch, features = x.shape
        return x.reshape(n, batch // self.m, self.m * features)


class Networks(nn.Sequential):
    """One side's n networks as one sequence of pair-batched layers; an input (1, batch, features) goes to each."""

    def __init__(self, *layers):
        super().__init__(*layers)
        self.n_pairs = next(self.parameters()).shape[0]

    def forward(self, x):
        x = x.expand(self.n_pairs, *x.shape[-2:])
        for layer in self:
            x = layer(x)
        return x


def generator(n, cfg, x_dim):
    """n generators, noise (z_dim) -> a sample (x_dim)."""
    h, layers = cfg['h_dim'], []
    for fan_in in [cfg['z_dim']] + [h] * (cfg['layers'] - 1):
        layers.append(Linear(n, fan_in, h))
        if cfg['batch_norm']:
            layers.append(BatchNorm(n, h))
        layers.append(nn.ReLU(inplace=True))
    output = [] if cfg['dataset'] in MIXTURES else [IMAGE_OUTPUT()]
    return Networks(*layers, Linear(n, h, x_dim), *output)


def discriminator(n, cfg, x_dim):
    """n discriminators, a sample (x_dim) -> the logit of P(real); with pack > 1 (PacGAN), a pack of that many
    samples -> one logit."""
    h, layers = cfg['h_dim'], [Pack(cfg['pack'])] if cfg['pack'] > 1 else []
    for fan_in in [x_dim * cfg['pack']] + [h] * (cfg['layers'] - 1):
        layers.append(Linear(n, fan_in, h))
        if cfg['batch_norm']:
            layers.append(BatchNorm(n, h))
        layers.append(nn.ReLU(inplace=True))
    return Networks(*layers, Linear(n, h, 1))


class Side:
    """All generators or all discriminators: the networks, their optimiser (one per network, where its update is
    elementwise, as torch.optim's are; None for networks that are kept and moved but not trained), and origin[i],
    the pair whose network slot i holds now."""

    def __init__(self, model, optimizer, n_pairs):
        self.model, self.optimizer, self.origin = model, optimizer, list(range(n_pairs))

    def weights(self):
        """The networks' weights and buffers, each with one slice per network."""
        return [*self.model.parameters(), *self.model.buffers()]

    def per_network(self):
        """Every tensor with one slice per network: weights, buffers, optimiser state (not its scalar step)."""
        kept = self.optimizer.state.values() if self.optimizer else []
        state = [t for s in kept for t in s.values() if torch.is_tensor(t) and t.dim()]
        return [*self.weights(), *state]

    def state_dict(self):
        optimizer = self.optimizer.state_dict() if self.optimizer else None
        return {'model': self.model.state_dict(), 'optimizer': optimizer, 'origin': self.origin}

    def load_state_dict(self, state):
        self.model.load_state_dict(state['model'])
        if self.optimizer:
            settings = [{k: v for k, v in group.items() if k != 'params'} for group in self.optimizer.param_groups]
            self.optimizer.load_state_dict(state['optimizer'])
            for group, own in zip(self.optimizer.param_groups, settings):
                group.update(own)  # the lr and settings that the code gives, not those the checkpoint kept
        self.origin = list(state['origin'])


def make_pairs(cfg, x_dim, dev, dtype, n=None):
    """{'G': every generator, 'D': every discriminator}, each a Side; n of each (default n_pairs)."""
    n = n or cfg['n_pairs']
    G = generator(n, cfg, x_dim).to(dev, dtype)
    D = discriminator(n, cfg, x_dim).to(dev, dtype)
    G_optimizer = torch.optim.Adam(G.parameters(), lr=cfg['lr'], betas=(cfg['beta1'], 0.999), fused=True)
    D_optimizer = torch.optim.Adam(D.parameters(), lr=cfg['lr'], betas=(cfg['beta1'], 0.999), fused=True)
    return {'G': Side(G, G_optimizer, cfg['n_pairs']), 'D': Side(D, D_optimizer, cfg['n_pairs'])}


@torch.no_grad()
def start_alike(pairs):
    """same_init (the authors' code): every pair's networks, of every side, start from pair 1's weights."""
    for side in pairs.values():
        for t in side.weights():
            t.copy_(t[:1].expand_as(t))


# ------------------------------------------------------------------------------------
# the losses, from D's logits (softplus: the log of a sigmoid without its overflow); one value per pair

def d_loss(real_logit, fake_logit):
    """-mean(log D(x) + log(1 - D(G(z))))."""
    return F.softplus(-real_logit).mean((1, 2)) + F.softplus(fake_logit).mean((1, 2))


def g_loss(fake_logit):
    """-mean(log D(G(z))), the non-saturating generator loss."""
    return F.softplus(-fake_logit).mean((1, 2))


# ------------------------------------------------------------------------------------
# every pair's step at once: a D step, then a G step against the updated D

def noisy(t, noise):
    return t if noise is None else t + noise


def clip_gradients(model, max_norm):
    """Scale each network's gradient to norm max_norm where it is longer (clip_grad_norm_ on each pair's network)."""
    if max_norm:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norms = torch.stack([g.flatten(1).square().sum(1) for g in grads]).sum(0).sqrt()
        scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.view(-1, *[1] * (g.dim() - 1)))


def train_step(G, D, z, x, y=None, input_noise=(None, None, None), clip=0.0):
    """One step of every pair. x: each pair's real batch (n_pairs, batch, x_dim), where every pair sees the same
    one a view of it, so that a gradient with respect to x (an R1 penalty's) is each pair's own; z: (1, batch,
    z_dim) shared by every pair or (n_pairs, batch, z_dim); y: x's labels (n_pairs, batch), unused (a conditional
    GAN's edit reads them). Pair i's losses reach only pair i's networks, so one backward of their sum trains
    every pair. Returns each pair's statistics, {name: (n_pairs,) or one value for all}."""
    fake = G.model(z)  # each generator runs once; the G step reuses its samples

    real_logit = D.model(noisy(x, input_noise[0]))
    fake_logit = D.model(noisy(fake.detach(), input_noise[1]))  # detached: this step trains D only
    D_loss = d_loss(real_logit, fake_logit)
    D.optimizer.zero_grad()
    D_loss.sum().backward()
    clip_gradients(D.model, clip)
    D.optimizer.step()

    D.model.requires_grad_(False)  # the G step trains G only: no gradients for D's weights
    G_loss = g_loss(D.model(noisy(fake, input_noise[2])))
    D.model.requires_grad_(True)
    G.optimizer.zero_grad()
    G_loss.sum().backward()
    clip_gradients(G.model, clip)
    G.optimizer.step()

    with torch.no_grad():
        return {'D_loss': D_loss, 'G_loss': G_loss, 'D(x)': torch.sigmoid(real_logit).mean((1, 2)),
                'D(G(z))': torch.sigmoid(fake_logit).mean((1, 2))}


# ------------------------------------------------------------------------------------
# the GAP swap

def swaps_at(it, cfg):
    """Whether the discriminators change partners after iteration it: every K iterations (K=0: never)."""
    return cfg['K'] > 0 and it > 0 and it % cfg['K'] == 0


def new_partners(cfg, it):
    """The pairing after a swap at iteration it: generator i gets the discriminator at partners[i]. 'derangement':
    no discriminator stays with its generator; 'matching' (the paper's Algorithm 1): n_pairs/2 random pairs (i, j)
    exchange theirs, and with an odd number of pairs one sits the swap out."""
    n, rng = cfg['n_pairs'], torch.Generator().manual_seed((cfg['seed'] * 1_000_003 + it) * 31 + 1)  # as resumed
    if cfg['swap'] == 'matching':
        order, partners = torch.randperm(n, generator=rng), torch.arange(n)
        partners[order[0:n - 1:2]], partners[order[1:n:2]] = order[1:n:2], order[0:n - 1:2]
        return partners
    while True:
        partners = torch.randperm(n, generator=rng)
        if (partners != torch.arange(n)).all():
            return partners


def swap_discriminators(D, partners, moves='network'):
    """GAP's swap: generator i now trains against the discriminator that was at partners[i]. moves='weights' (the
    authors' code): only weights and buffers move; each slot keeps its optimiser state (Adam's moments)."""
    swap_networks(D, partners, D.per_network() if moves == 'network' else D.weights())


@torch.no_grad()
def swap_networks(side, partners, tensors=None):
    """Slot i takes what slot partners[i] held: tensors (default: the whole network, its weights, buffers and
    optimiser state) and its origin."""
    for t in side.per_network() if tensors is None else tensors:
        t.copy_(exchange(t, partners))  # exchange: t[partners], also across torchrun's processes (support part)
    side.origin = [side.origin[j] for j in partners.tolist()]


# ------------------------------------------------------------------------------------
# one iteration and the training loop

def draw_noise(cfg, batch, rng, dtype):
    """Each generator's noise from its prior: (n_pairs, batch, z_dim), or (1, batch, z_dim) shared by every pair."""
    n, shape = cfg['n_pairs'], (cfg['n_pairs'] if cfg['own_noise'] else 1, batch, cfg['z_dim'])
    gaussian = lambda: torch.randn(shape, generator=rng, device=rng.device, dtype=dtype)
    uniform = lambda: torch.rand(shape, generator=rng, device=rng.device, dtype=dtype) * 2 - 1
    if cfg['prior'] != 'mixed':
        return gaussian() if cfg['prior'] == 'gaussian' else uniform()
    first, rest = gaussian().expand(n, -1, -1), uniform().expand(n, -1, -1)
    return torch.cat([first[:n // 2], rest[n // 2:]])  # the first half of the generators Gaussian, the rest uniform


def to_slots(z, G):
    """Noise drawn per generator (row k: generator k's) routed to the slots the generators hold now (G.origin)."""
    return z if len(z) == 1 or G.origin == list(range(len(z))) else z[G.origin]


def input_noise_of(cfg, it, x_dim, rng, dtype):
    """Each pair's noise on D's real, fake and G-step inputs: std input_noise decaying linearly to 0 at the end."""
    if not cfg['input_noise']:
        return None, None, None
    std = cfg['input_noise'] * (1 - it / max(cfg['iterations'] - 1, 1))
    return tuple(std * torch.randn(cfg['n_pairs'], cfg['mb_size'], x_dim, generator=rng, device=rng.device,
                                   dtype=dtype) for _ in range(3))


def gap_iteration(it, pairs, data, noise_rng, cfg):
    """Iteration it: fresh noise and a batch, every pair's step, and a swap where swaps_at says. data.next(): the
    next minibatch as D's inputs, and its labels (support part: Batches)."""
    G, D, dtype = pairs['G'], pairs['D'], getattr(torch, cfg['dtype'])
    z = to_slots(draw_noise(cfg, cfg['mb_size'], noise_rng, dtype), G)
    # every pair's real batch: one batch shared by every pair is viewed once per pair, so that each pair's real
    # inputs are its own (a gradient with respect to them, as an R1 penalty takes, is then each pair's)
    x, y = (t.expand(cfg['n_pairs'], *t.shape[1:]) for t in data.next())
    input_noise = input_noise_of(cfg, it, x.shape[-1], noise_rng, dtype)
    # own_share: under torchrun, this process's pairs' part of what every pair drew (support part)
    z, x, y, *input_noise = (own_share(t) for t in (z, x, y, *input_noise))
    stats = train_step(G, D, z, x, y, input_noise, cfg['clip'])
    if swaps_at(it, cfg):
        swap_discriminators(D, new_partners(cfg, it), cfg['swap_moves'])
    return stats


def train_loop(cfg, pairs, data, noise_rng, recorder):
    """Train to the last iteration; recorder (support part: Recorder) logs, evaluates, saves, and stops on Ctrl-C."""
    for it in range(recorder.iteration + 1, cfg['iterations']):
        stats = gap_iteration(it, pairs, data, noise_rng, cfg)
        if recorder.after(it, stats):
            return True
    return False


# ------------------------------------------------------------------------------------
# samples and scores outside training: the sample grids, the evaluation and --compare call the networks only
# through these two (in eval mode, without gradients). An edit of what the networks take (a conditional GAN's
# labels) or of which network draws the samples (an average of a generator's weights) goes here too.

def draw_samples(pairs, z, y):
    """Every generator's samples of noise z, (n_pairs, batch, x_dim) by slot. y (1, batch): the labels asked for,
    unused here (a conditional GAN's edit reads them)."""
    return pairs['G'].model(z)


def score_inputs(pairs, x, y):
    """Every discriminator's logits of inputs x (1 or n_pairs, batch, x_dim) whose labels are y (1, batch), unused
    here: (n_pairs, batch, 1) by slot. A packing D (PacGAN) judges packs of consecutive inputs, the last pack
    filled up from the first inputs, and each input gets its pack's logit."""
    D, batch = pairs['D'].model, x.shape[1]
    pack = next((layer.m for layer in D.modules() if isinstance(layer, Pack)), 1)
    if pack > 1:
        filled = torch.arange(-(-batch // pack) * pack, device=x.device) % batch
        x, y = x[:, filled], y[:, filled]
    return D(x).repeat_interleave(pack, 1)[:, :batch]


# ====================================================================================
# Support code: a layer for edits, the command line, the data, torchrun's processes, files and checkpoints, the
# evaluation, comparing runs, pictures, and the run. Sides, optimisers and statistics are treated generically.
# ====================================================================================

class PerPair(nn.Module):
    """n independent copies of any torch module (a convolution, a block, ...), each made by make() and run side by
    side by torch.func.vmap: every weight gets its leading pairs dimension."""

    def __init__(self, n, make):
        super().__init__()
        copies = [make() for _ in range(n)]
        if any(nn.utils.parametrize.is_parametrized(m) or m._forward_pre_hooks for c in copies for m in c.modules()):
            raise ValueError('PerPair cannot stack parametrised modules (spectral_norm, weight_norm, ...); for '
                             'spectral norm per pair, use SpectralLinear(n, fan_in, fan_out) in place of Linear')
        params, buffers = torch.func.stack_module_state(copies)
        self.names = {name.replace('.', '__'): name for name in (*params, *buffers)}
        for name, value in params.items():
            self.register_parameter(name.replace('.', '__'), nn.Parameter(value))
        for name, value in buffers.items():
            self.register_buffer(name.replace('.', '__'), value)
        self.template = [copies[0].to('meta')]  # in a list: not a submodule, its own weights are never used

    def forward(self, x):
        tensors = {self.names[name]: t for name, t in (*self.named_parameters(), *self.named_buffers())}
        call = lambda state, each: torch.func.functional_call(self.template[0].train(self.training), state, (each,))
        return torch.func.vmap(call)(tensors, x)


CLASSIFIER_VERSION = 2  # bump when the classifier or its training changes, so caches are rebuilt
CLASSIFIER_EPOCHS = {'mnist': 3, 'fashion_mnist': 6}
CLASSIFIER_THREADS = 2  # the classifier trains on this many CPU threads, whatever a run's --threads (the study's: 2)
# whole numbers (2e5 written in the block is one)
COUNTS = ('z_dim', 'h_dim', 'layers', 'pack', 'n_pairs', 'K', 'mb_size', 'iterations', 'seed', 'log_every',
          'sample_every', 'train_size', 'eval_every', 'eval_samples', 'threads')
# a resume may change these, and every learning rate (a name that starts with lr: lr, lr_G, lr_D, ...): the run
# continues exactly, only its schedule, its files or its learning rates change
RESUMABLE = ('iterations', 'log_every', 'sample_every', 'out_dir', 'resume', 'resume_edited', 'data_root',
             'eval_every', 'eval_at_end', 'eval_samples', 'classifier_dir', 'compare', 'device', 'threads')
# the names the support code reads: an edit may remove any other from the block
NEEDED = ('n_pairs', 'mb_size', 'iterations', 'seed', *RESUMABLE, 'dataset', 'train_size', 'dtype')
POOL_KEYS = ('z_dim', 'h_dim', 'layers', 'dataset')  # runs that differ in these cannot share one pool in --compare
IMAGE_DATASETS = {'mnist': 'MNIST', 'fashion_mnist': 'FashionMNIST'}  # torchvision's class and folder names
STACKED = 'stacked_mnist'  # three MNIST digits as the colour channels (stacked_mnist, below): 1,000 modes
STACKED_SIZE, STACKED_SAMPLES = 128_000, 26_000  # its published training set and samples per generator (PacGAN, VEEGAN)
MNIST_FILES = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte',
               't10k-labels-idx1-ubyte')
SCRIPT_NAME = os.path.basename(__file__)  # this file's name, in every message (a renamed copy says its own)
ACCEPTED = {bool: 'True or False', int: 'a whole number', float: 'a number', str: 'a string',
            None: 'a number, True/False or a string'}
KINDS_OF = {int: COUNTS, float: ('lr', 'beta1', 'input_noise', 'clip'),  # what the block's names take, as shipped
            bool: ('paper', 'own_noise', 'batch_norm', 'same_init', 'resume', 'resume_edited', 'eval_at_end'),
            str: ('prior', 'swap', 'swap_moves', 'out_dir', 'dataset', 'data_root', 'classifier_dir', 'compare',
                  'device', 'dtype')}


def resumable(name):
    """Whether a resume may change the hyperparameter name (RESUMABLE, or a learning rate)."""
    return name in RESUMABLE or name.startswith('lr')


def seeds_alike(name):
    """Whether runs that differ in name alone are seeds of one configuration (the seed, or what a resume changes)."""
    return name == 'seed' or resumable(name)


# ------------------------------------------------------------------------------------
# command line: --name=value, checked against the kind of value each name takes

def read_block():
    """(name, default, meaning) of each line of the hyperparameter block, read from this file; refuses another line."""
    with open(__file__) as f:
        lines = f.read().splitlines()
    first, table = next(i for i, line in enumerate(lines) if line.startswith('# --- hyperparameters')) + 1, []
    for number, line in enumerate(lines[first:], first + 1):
        if line.startswith('# --- end of hyperparameters'):
            return table
        found = re.fullmatch(r'(\w+)\s*=(?!=)\s*[^#]+?(?:\s*#\s*(.*))?', line)  # as Python writes it: h_dim=64 too
        where = f'{SCRIPT_NAME} line {number}'
        if line.strip() and not line.startswith('#') and (not found or found[1] not in globals()):
            refuse(f'{where}: {line.strip()!r} is not a hyperparameter; write one `name = value  # meaning` per line')
        if found:
            name, value = found[1], globals()[found[1]]
            if of_kind(kind_of(name, value), value) is None:
                refuse(f'{where}: {name} must be {ACCEPTED[kind_of(name, value)]}, not {value!r}')
            table.append((name, of_kind(kind_of(name, value), value), found[2] or ''))


def read_anywhere():
    """The names that the code outside the hyperparameter block looks up, as cfg[NAME] or cfg.get(NAME) with NAME
    quoted: the hyperparameters it reads (a name that no code reads, which an edit left behind, `lr` beside `lr_G`
    and `lr_D`, changes nothing)."""
    with open(__file__) as f:
        source = f.read()
    outside = source[:source.index('# --- hyperparameters')] + source[source.index('# --- end of hyperparameters'):]
    return set(re.findall(r'(?:\[|\.get\()\s*[\'"](\w+)[\'"]', outside))


def kind_of(name, default):
    """The kind a hyperparameter takes: KINDS_OF's; for a name added to the block, its default's (5 a whole number,
    5.0 a number, True a bool, 'a' a string; None: no kind)."""
    kind = next((kind for kind, names in KINDS_OF.items() if name in names), type(default))
    return kind if kind in ACCEPTED else None


def of_kind(kind, value):
    """value as a value of kind: a whole float (2e5) as a count, an integer as a float; None for another kind."""
    if kind is int and type(value) is float and value.is_integer() or kind is float and type(value) is int:
        return kind(value)
    return value if type(value) is kind else None


def refuse(message):
    """Bad input: one line on stderr and exit status 2, before any work starts."""
    print(f'{SCRIPT_NAME}: error: {message}', file=sys.stderr)
    sys.exit(2)


def convert(name, text, default):
    """--name=text as a value of name's kind (numbers as the block writes them: 1000, 1_000, 1e3), or a refusal."""
    kind, value = kind_of(name, default), text
    if kind is bool:
        value = {'true': True, '1': True, 'false': False, '0': False}.get(text.lower())
    elif kind is not str:
        with suppress(ValueError):
            value = of_kind(kind, int(text) if re.fullmatch(r'[-+]?\d[\d_]*', text) else float(text))
        value = None if value is text else value
    if value is None:
        refuse(f'--{name}={text}: expected {ACCEPTED[kind]} (default {default!r})')
    return value


def check(cfg):
    """Refuse values that make no sense, before any work starts; a rule whose names an edit removed from the block
    is skipped (the code that read them is gone too)."""
    at_least = {'z_dim': 1, 'h_dim': 1, 'layers': 1, 'n_pairs': 1, 'mb_size': 1, 'iterations': 1, 'log_every': 1,
                'sample_every': 1, 'eval_samples': 2, 'K': 0, 'train_size': 0, 'eval_every': 0, 'threads': 0,
                'input_noise': 0, 'clip': 0, 'pack': 1}  # 0: off (never, all, torch's default, none)
    one_of = {'dataset': (*IMAGE_DATASETS, STACKED, *MIXTURES), 'dtype': ('float32', 'float64'),
              'prior': ('gaussian', 'uniform', 'mixed'), 'swap': ('derangement', 'matching'),
              'swap_moves': ('network', 'weights')}
    rules = [((k,), lambda c, k=k, low=low: c[k] >= low and math.isfinite(c[k]),
              f'{k} must be at least {low}' + ' (0: off)' * (low == 0)) for k, low in at_least.items()]
    rules += [((k,), lambda c, k=k, values=values: c[k] in values, f'{k} must be one of {", ".join(values)}')
              for k, values in one_of.items()]
    rules += [((k,), lambda c, k=k: c[k] > 0 and math.isfinite(c[k]), f'{k} must be a positive number')
              for k in cfg if k.startswith('lr') and type(cfg[k]) in (int, float)]  # lr, lr_G, lr_D, ...
    rules += [
        (('K', 'n_pairs'), lambda c: c['K'] == 0 or c['n_pairs'] >= 2,
         'K>0 swaps discriminators between pairs: it needs n_pairs >= 2 (or K=0)'),
        (('mb_size', 'batch_norm'), lambda c: c['mb_size'] >= 2 or not c['batch_norm'],
         'batch_norm needs mb_size of at least 2'),
        (('mb_size', 'pack'), lambda c: c['mb_size'] % c['pack'] == 0,
         f'mb_size={cfg.get("mb_size")} cannot be cut into packs of pack={cfg.get("pack")}: mb_size must be a '
         f'multiple of pack (PacGAN\'s D sees mb_size/pack packs a step)'),
        (('same_init', 'own_noise', 'prior', 'input_noise'),
         lambda c: not c['same_init'] or c['own_noise'] or c['prior'] == 'mixed' or c['input_noise'] > 0,
         'same_init with every pair on the same noise and batches trains copies of one GAN: add own_noise=True, '
         "prior='mixed' or input_noise (or paper=True)"),
        (('beta1',), lambda c: 0 <= c['beta1'] < 1, 'beta1 must be at least 0 and below 1'),
        (('seed',), lambda c: 0 <= c['seed'] < 2 ** 32, 'seed must be a whole number from 0 to 2**32 - 1 (4294967295)'),
        (('device',), lambda c: re.fullmatch(r'auto|cpu|cuda(:\d+)?', c['device']),
         "device must be 'auto', 'cpu' or 'cuda[:N]'"),
        (('device',), lambda c: not c['device'].startswith('cuda') or torch.cuda.is_available(),
         f"device {cfg.get('device')!r} asked for, but CUDA is not available here (use --device=cpu or auto)")]
    for names, ok, message in rules:
        if all(name in cfg for name in names) and not ok(cfg):
            refuse(message)


block_values = {}  # the block as the last parse_args read it: checkpoints keep it, so that a resume can tell its edits
explicit = set()  # the names given explicitly: on the command line, and, on a resume, those edited in the block


def parse_args(argv):
    """The hyperparameters: the block's, overridden by --name=value arguments; on a resume, the checkpoint's but for
    those given explicitly (on the command line, or edited in the block since its run). Sets block_values, explicit."""
    global block_values, explicit
    table = read_block()
    cfg = {name: default for name, default, _ in table}
    block_values, explicit, read = dict(cfg), set(), read_anywhere()
    missing = [name for name in NEEDED if name not in cfg]
    if missing:
        refuse(f'the hyperparameter block has no {", ".join(missing)}, which the support code reads: keep '
               f'{"it" if len(missing) == 1 else "them"} in the block')
    for arg in argv:
        if arg in ('-h', '--help'):
            with suppress(BrokenPipeError):  # `--help | head`: the reader stopped early, which is no error
                print(f'{__doc__.strip()}\n\nhyperparameters (--name=value):')
                print('\n'.join(f'  --{name:<15} {default!r:<18} {meaning}' for name, default, meaning in table))
                sys.stdout.flush()
            sys.exit(0)
        name, eq, text = arg[2:].partition('=')
        if not (arg.startswith('--') and eq and name in cfg):
            spaced = f' (write --{name}=VALUE, without a space)' if not eq and name in cfg else ''
            refuse(f'unknown argument {arg!r}{spaced}: use --name=value with a name from: {", ".join(cfg)}')
        cfg[name] = convert(name, text, cfg[name])
        explicit.add(name)
        if name not in read:
            print(f"{SCRIPT_NAME}: warning: --{name} changes nothing: no code in {SCRIPT_NAME} reads cfg['{name}']",
                  file=sys.stderr)
    if cfg.get('paper'):  # the paper's conditions, where the command line does not say otherwise
        cfg.update({name: value for name, value in PAPER.items() if name not in explicit})
    if cfg['dataset'] == STACKED and 'eval_samples' not in explicit:  # the published protocol's count
        cfg['eval_samples'] = STACKED_SAMPLES
    with suppress(Exception):  # a missing or damaged checkpoint: load_checkpoint refuses it
        if cfg['resume'] and not cfg['compare']:
            state = torch.load(checkpoint_path(cfg), map_location='cpu', weights_only=True)
            saved, then = state['hyperparameters'], state['block']
            explicit |= {name for name, value in then.items() if name in block_values and value != block_values[name]}
            cfg = {k: saved[k] if k in saved and k not in explicit | {'out_dir', 'resume'} else cfg[k] for k in cfg}
    check(cfg)
    return cfg


# ------------------------------------------------------------------------------------
# data: the whole training set as one uint8 tensor on the training device

def load_images(dataset, root, train=True):
    """MNIST or Fashion-MNIST as uint8 (N, 784) images and labels, or one clear message and exit 1."""
    import torchvision
    folder = IMAGE_DATASETS[dataset]
    raw = os.path.join(root, folder, 'raw')
    made = [d for d in (raw, os.path.join(root, folder), root) if not os.path.exists(d)]  # by torchvision, below
    try:
        quiet = StringIO()  # torchvision narrates every failed mirror; the message below says what matters
        with redirect_stdout(quiet), redirect_stderr(quiet):
            data = getattr(torchvision.datasets, folder)(root, train=train, download=True)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        for empty in made:  # leave no empty folders behind, which would look like a half-done download
            with suppress(OSError):
                os.rmdir(empty)
        sys.exit(f'{SCRIPT_NAME}: could not load {folder} from {raw}/ ({reason}).\n'
                 f'To run offline, put the four uncompressed files {", ".join(MNIST_FILES)}\n'
                 f'in {raw}/ (torchvision\'s raw layout), or point --data_root at a folder that has them.')
    return data.data.reshape(len(data.data), -1), data.targets


def mixture(dataset):
    """Centres (modes, 2) and std of a 2-D Gaussian mixture: 8 on a circle of radius 2, std 0.02; 25 on the grid
    {-4,-2,0,2,4}^2, std 0.05; or R15 (Veenman et al. 2002), centred at the origin: one Gaussian at the centre, 7 at
    radius 2.025 and 7 at 6.4 around it, at angles k*360/7, std 0.3."""
    if dataset == 'ring8':
        angle = torch.arange(8) * 2 * math.pi / 8
        return 2 * torch.stack([angle.cos(), angle.sin()], 1), 0.02
    if dataset == 'r15':
        angle = torch.arange(7) * 2 * math.pi / 7
        ring = torch.stack([angle.cos(), angle.sin()], 1)
        return torch.cat([torch.zeros(1, 2), 2.025 * ring, 6.4 * ring]), 0.3
    axis = torch.arange(-4, 5, 2.0)
    return torch.cartesian_prod(axis, axis), 0.05


def sample_mixture(dataset, n, seed):
    """n points of a 2-D mixture (float32) and the index of the mode each came from."""
    rng = torch.Generator().manual_seed(seed)
    centres, std = mixture(dataset)
    modes = torch.randint(len(centres), (n,), generator=rng)
    return centres[modes] + std * torch.randn(n, 2, generator=rng), modes


def stacked_mnist(root, n=STACKED_SIZE, train=True):
    """Stacked MNIST: n examples of three digits as the colour channels, uint8 (n, 3 * 784) channel by channel, and
    their labels 100 * d1 + 10 * d2 + d3. Each digit is its own uniform draw, from a fixed seed, from MNIST's 60,000
    training digits (train) or its 10,000 test digits: the published sets draw from all 70,000."""
    digits, labels = load_images('mnist', root, train=train)
    picks = torch.randint(len(digits), (n, 3), generator=torch.Generator().manual_seed(31 if train else 37))
    return digits[picks].reshape(n, 3 * 784), (labels[picks].long() * torch.tensor([100, 10, 1])).sum(1)


def training_data(cfg):
    """The whole training set and its labels: image pixels as uint8 (N, 784; Stacked MNIST's 3 * 784), or 60,000
    points of a 2-D mixture."""
    if cfg['dataset'] in MIXTURES:
        return sample_mixture(cfg['dataset'], 60_000, seed=12345)  # one fixed training set for every seed
    if cfg['dataset'] == STACKED:
        return stacked_mnist(cfg['data_root'])
    return load_images(cfg['dataset'], cfg['data_root'])


def used_for_training(data, cfg):
    """The part of the training set the networks see: the first train_size examples (0: all)."""
    if cfg['train_size'] > len(data):
        refuse(f'train_size={cfg["train_size"]} but the {cfg["dataset"]} training set has only {len(data)} examples')
    return data[:cfg['train_size'] or len(data)]


def held_out_data(cfg, n):
    """n examples the networks never train on and their labels: the test split's first n images, or fresh draws of
    the mixture."""
    if cfg['dataset'] in MIXTURES:
        return sample_mixture(cfg['dataset'], n, seed=777)
    if cfg['dataset'] == STACKED:
        return stacked_mnist(cfg['data_root'], n, train=False)
    images, labels = load_images(cfg['dataset'], cfg['data_root'], train=False)
    return images[:n], labels[:n]


class Batches:
    """Minibatches as D's inputs and their labels, (1, batch, x_dim) and (1, batch), shared by every pair: every
    example once per epoch, in a fresh shuffle each epoch (as the reference's reader, a batch may span two)."""

    def __init__(self, data, labels, mb_size, seed, dtype):
        self.data, self.labels, self.mb_size, self.dtype = data, labels, mb_size, dtype
        self.rng = torch.Generator(device=data.device).manual_seed(seed)
        self.order, self.pos = self.shuffle(), 0

    def shuffle(self):
        return torch.randperm(len(self.data), generator=self.rng, device=self.data.device)

    def next(self):
        rows = self.order[self.pos:self.pos + self.mb_size]
        self.pos += len(rows)
        while len(rows) < self.mb_size:  # past the epoch's end: the rest from the next shuffle
            self.order = self.shuffle()
            self.pos = min(self.mb_size - len(rows), len(self.order))
            rows = torch.cat([rows, self.order[:self.pos]])
        # index_select: a plain row gather, several times faster than data[rows]
        return as_inputs(self.data.index_select(0, rows), self.dtype)[None], self.labels.index_select(0, rows)[None]

    def state_dict(self):
        return {'rng': self.rng.get_state(), 'order': self.order.cpu(), 'pos': self.pos}

    def load_state_dict(self, state):
        self.rng.set_state(state['rng'])
        self.order, self.pos = state['order'].to(self.data.device), state['pos']


class PairBatches(list):
    """Each pair's own minibatches (own_noise): one Batches per pair, each its own shuffle; (n_pairs, batch, ...)."""

    def next(self):
        x, y = zip(*(batches.next() for batches in self))
        return torch.cat(x), torch.cat(y)

    def state_dict(self):
        return {'each': [batches.state_dict() for batches in self]}

    def load_state_dict(self, state):
        for batches, saved in zip(self, state['each']):
            batches.load_state_dict(saved)


def make_batches(data, labels, cfg, seed, dtype):
    """One shuffle shared by every pair, or each pair its own (own_noise)."""
    if not cfg.get('own_noise'):
        return Batches(data, labels, cfg['mb_size'], seed, dtype)
    seeds = [seed + 1_000_003 * (k + 1) for k in range(cfg['n_pairs'])]
    return PairBatches(Batches(data, labels, cfg['mb_size'], seed, dtype) for seed in seeds)


def as_inputs(batch, dtype):
    """Data as network inputs: image pixels (stored as uint8) in PIXELS, 2-D points as they are."""
    if batch.dtype != torch.uint8:
        return batch.to(dtype)
    low, high = PIXELS
    return batch.to(dtype) / 255 if (low, high) == (0.0, 1.0) else batch.to(dtype) * ((high - low) / 255) + low


def as_unit_pixels(samples):
    """Generated images as pixels in [0, 1], as the classifier and the pictures take them."""
    low, high = PIXELS
    return (samples - low) / (high - low)


# ------------------------------------------------------------------------------------
# torchrun: process r trains pairs r*L .. r*L+L-1 (L = n_pairs / processes). Every process draws the same noise
# and batches as a single process would and keeps its own pairs' (own_share); at a swap the networks move between
# processes (exchange). In a single process these do nothing.

class Processes:
    """This process and, under torchrun, the others: one instance, procs, which start() sets up."""
    world, rank, leader, slots, device = 1, 0, True, None, torch.device('cpu')

    def start(self, cfg):
        """Join the other processes (under torchrun); returns the training device."""
        self.world, self.rank = int(os.environ.get('WORLD_SIZE', 1)), int(os.environ.get('RANK', 0))
        self.leader, self.device = self.rank == 0, pick_device(cfg['device'])
        if self.world > 1:
            if cfg['n_pairs'] % self.world:
                refuse(f'n_pairs={cfg["n_pairs"]} cannot be spread evenly over {self.world} processes')
            import datetime
            import torch.distributed as dist
            if self.device.type == 'cuda':
                self.device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
                torch.cuda.set_device(self.device)
            self.dist = dist  # a process gives up on the others after 5 minutes without them
            dist.init_process_group('nccl' if self.device.type == 'cuda' else 'gloo',
                                    timeout=datetime.timedelta(seconds=300))
            mine = cfg['n_pairs'] // self.world
            self.slots = torch.arange(self.rank * mine, (self.rank + 1) * mine)
        return self.device

    def say(self, message):
        """Print a line, from the leader only (one log, however many processes)."""
        if self.leader:
            print(message, flush=True)

    def gather(self, tensor, dim=0):
        """Every process's tensor, concatenated along dim in process order (the tensor itself in one process)."""
        if self.world == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        self.dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim)

    def anyone(self, flag):
        """Whether flag is set in any process (so that all stop together)."""
        if self.world == 1:
            return bool(flag)
        flag = torch.tensor([float(bool(flag))], device=self.device)
        self.dist.all_reduce(flag, op=self.dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self, finished):
        """Leave the other processes (after the others are done too, when finished)."""
        if self.world > 1 and self.dist.is_initialized():
            if finished:
                self.dist.barrier()  # nobody tears down while another still talks
            self.dist.destroy_process_group()


procs = Processes()


def pick_device(name):
    return torch.device('cuda' if name == 'auto' and torch.cuda.is_available() else 'cpu' if name == 'auto' else name)


def own_share(t):
    """This process's pairs' part of t, every pair's (n_pairs, ...); t shared by every pair, (1, ...), as it is,
    and one tensor viewed once per pair (expand) still a view."""
    if procs.world == 1 or t is None or len(t) == 1:
        return t
    return t[:len(procs.slots)] if t.stride(0) == 0 else t[procs.slots.to(t.device)]


def exchange(t, partners):
    """t (this process's slots of a per-network tensor) after slot i takes what slot partners[i] held."""
    mine = partners if procs.world == 1 else partners[procs.slots]
    return procs.gather(t)[mine.to(t.device)]


def map_networks(state, f):
    """A side's state_dict with f applied to every per-network tensor (one with a leading pairs dimension)."""
    if torch.is_tensor(state):
        return f(state) if state.dim() else state
    if isinstance(state, dict):
        return {k: map_networks(v, f) for k, v in state.items()}
    return type(state)(map_networks(v, f) for v in state) if isinstance(state, (list, tuple)) else state


def share_of_process(pairs, cfg, x_dim):
    """The pairs this process trains: all of them in one process; under torchrun copies of its slots' slices."""
    if procs.world == 1:
        return pairs
    share = make_pairs(cfg, x_dim, procs.device, getattr(torch, cfg['dtype']), n=len(procs.slots))
    for name, side in share.items():
        side.load_state_dict(map_networks(pairs[name].state_dict(), lambda t: t[procs.slots.to(t.device)]))
    return share


def collect_pairs(pairs, share):
    """Bring pairs (every pair) up to date from every process's share (every process must call it)."""
    if share is not pairs:
        for name, side in pairs.items():
            side.load_state_dict(map_networks(share[name].state_dict(), procs.gather))


# ------------------------------------------------------------------------------------
# files: each written whole or not at all; checkpoints loaded with weights_only=True

class WriteFailed(Exception):
    """A file could not be written (out_dir unwritable, disk full, ...): the run stops with this one line."""


@contextmanager
def replacing(path):
    """A temporary path to write to, renamed over path once written: never half a file; a failure: WriteFailed."""
    tmp = path + '.tmp'
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as error:
        with suppress(OSError):
            os.remove(tmp)
        raise WriteFailed(f'cannot write {path} ({error.strerror or error})') from error


def write_csv(path, header, rows):
    """A CSV file of rows (dicts, or lists in header's order): floats as 6 digits, lists as numbers."""
    def cell(v):
        return ' '.join(f'{x:.4g}' for x in v) if isinstance(v, list) else f'{v:.6g}' if isinstance(v, float) else v
    with replacing(path) as tmp, open(tmp, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([cell(row.get(k, '')) for k in header] if isinstance(row, dict) else row for row in rows)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def checkpoint_path(cfg):
    return os.path.join(cfg['out_dir'], 'checkpoint.pt')


def save_checkpoint(path, state):
    with replacing(path) as tmp, open(tmp, 'wb') as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def algorithm_code():
    """{name: crc32} of each definition of the algorithm part as Python parses it (comments, docstrings and layout
    change nothing): checkpoints keep it, so that a resume and --compare can tell a run trained by other code."""
    with open(__file__) as f:
        source = f.read()
    code = {}
    for node in ast.parse(source[source.index('# --- end of hyperparameters'):source.index('\n# ====')]).body:
        for inner in ast.walk(node):
            if isinstance(inner, (ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(inner) is not None:
                inner.body = inner.body[1:] or [ast.Pass()]
        name = node.name if hasattr(node, 'name') else ast.unparse(getattr(node, 'targets', [node])[0])
        code[name] = zlib.crc32(ast.dump(node).encode())
    return code


def code_differences(then, now):
    """'d_loss changed; hinge added' between two algorithm_code()s; '' where they agree or then is unknown."""
    words = [(sorted(k for k in now if k in then and now[k] != then[k]), 'changed'),
             (sorted(k for k in now if k not in then), 'added'), (sorted(k for k in then if k not in now), 'removed')]
    return '; '.join(f'{", ".join(names)} {word}' for names, word in words if names) if then is not None else ''


def load_checkpoint(path, cfg, dev):
    """The checkpoint's state, or a refusal in one line of one that would not continue exactly (or at all)."""
    if not os.path.exists(path):
        refuse(f'--resume=True but there is no checkpoint at {path}')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
        saved = {name: default for name, default, _ in read_block()} | state['hyperparameters']
        state['iteration'], state['pairs'], state['code']  # everything a resume needs is there
    except Exception as error:
        refuse(f'cannot resume: {path} is damaged or not a checkpoint of this script ({type(error).__name__})')
    changed = '; '.join(f'{k}={saved[k]!r} there, {cfg[k]!r} now' for k in cfg
                        if not resumable(k) and saved.get(k) != cfg[k])
    edits, there = code_differences(state['code'], algorithm_code()), state.get('device', 'cpu')
    if changed:
        refuse(f'cannot resume from {path} with other settings, which would not continue it exactly ({changed}); '
               f'a resume may change only the learning rates (lr, lr_*) and {", ".join(RESUMABLE)}')
    if there != dev.type:
        refuse(f'cannot resume from {path} on the {dev.type}: it was written on the {there}, and its noise and data '
               f'order continue exactly only there (--device={there})')
    if edits and not cfg['resume_edited']:
        refuse(f"cannot resume from {path}: the algorithm's code differs from the one that trained it ({edits}); "
               f'--resume_edited=True continues it as it is now')
    return state


def load_pairs(pairs, saved, where):
    """Load every side from a checkpoint's, or refuse in one line where the script builds other networks."""
    for name, side in pairs.items():
        if name not in saved:
            refuse(f'{where} holds no {name}, which this script now builds: a network cannot join a run midway; '
                   f'start a fresh run (another --out_dir)')
        try:
            side.load_state_dict(saved[name])
        except (KeyError, RuntimeError, ValueError) as error:
            reason = str(error).strip().splitlines()[-1 if isinstance(error, RuntimeError) else 0].strip()
            refuse(f'{where} holds other networks than this script builds ({name}: {reason})')


# ------------------------------------------------------------------------------------
# evaluation: does each generator cover the data's modes, how good are its samples, does each D generalise?

def classifier():
    """A small convolutional digit classifier of pixels in [0, 1]; model[:-1] gives the Frechet distance's features."""
    return nn.Sequential(nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))


def fit_classifier(images, labels, epochs, dev, batch_size=128, seed=0):
    """Train a classifier on uint8 (N, 784) images with Adam, on CLASSIFIER_THREADS CPU threads whatever --threads
    says (a product summed by another number of threads rounds otherwise: another classifier, other metrics)."""
    torch.manual_seed(seed)
    model = classifier().to(dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, labels = images.to(dev), labels.to(dev).long()
    threads = torch.get_num_threads()
    torch.set_num_threads(CLASSIFIER_THREADS)
    try:
        for _ in range(epochs):
            for batch in torch.randperm(len(images), device=dev).split(batch_size):
                loss = F.cross_entropy(model(images[batch].float() / 255), labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@torch.no_grad()
def classify(model, pixels, chunk=500):
    """Class probabilities and features of (N, 784) pixels in [0, 1]."""
    features = [model[:-1](part.float()) for part in pixels.split(chunk)]
    return torch.cat([model[-1](part) for part in features]).softmax(1), torch.cat(features)


def load_classifier(cfg, dev, images, labels):
    """The classifier of cfg's images (cached, or trained now) and the test set's features' statistics; Stacked
    MNIST's is MNIST's, which stacked_metrics applies to each channel."""
    if cfg['dataset'] == STACKED:
        cfg, (images, labels) = {**cfg, 'dataset': 'mnist'}, load_images('mnist', cfg['data_root'])
    test_images, test_labels = load_images(cfg['dataset'], cfg['data_root'], train=False)
    fingerprint = [CLASSIFIER_VERSION, dev.type, CLASSIFIER_THREADS,  # all that makes its bits, as the cache's key
                   *(zlib.crc32(t.contiguous().numpy()) for t in (images, labels, test_images))]
    path, epochs = os.path.join(cfg['classifier_dir'], f'{cfg["dataset"]}.pt'), CLASSIFIER_EPOCHS[cfg['dataset']]
    model = classifier().to(dev)
    try:
        cached = torch.load(path, map_location=dev, weights_only=True)
        if cached['fingerprint'] != fingerprint:
            raise ValueError('trained on other data')
        model.load_state_dict(cached['model'])
        how = f'cached in {path}'
    except Exception:
        print(f'training the classifier that scores samples ({epochs} epochs on {len(images)} images: about a '
              f'minute on 2 CPU cores; once, then cached in {path})', flush=True)
        start = time.perf_counter()
        model = fit_classifier(images, labels, epochs, dev)
        how = f'trained in {time.perf_counter() - start:.0f}s'
        try:
            os.makedirs(cfg['classifier_dir'], exist_ok=True)
            save_checkpoint(path, {'fingerprint': fingerprint, 'model': model.state_dict()})
            how += f', cached in {path}'
        except (OSError, WriteFailed) as error:
            how += f', not cached ({error.strerror if isinstance(error, OSError) else error})'
    probs, features = classify(model.eval(), test_images.to(dev) / 255)
    accuracy = (probs.argmax(1).cpu() == test_labels).float().mean().item()
    print(f'classifier ({how}): {100 * accuracy:.2f}% accuracy on the {len(test_images)} test images')
    return model, feature_stats(features)


def feature_stats(features):
    """Mean and covariance of (N, d) features, in float64."""
    return features.double().mean(0), torch.cov(features.double().T)


def frechet_distance(stats_a, stats_b):
    """|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), the trace from the eigenvalues of the symmetric
    S_a^(1/2) S_b S_a^(1/2)."""
    (mu_a, cov_a), (mu_b, cov_b) = stats_a, stats_b
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item()


def coverage(counts, n_samples):
    """Modes covered (at least a third of their fair share of the samples) and KL(histogram || uniform)."""
    modes, share = len(counts), counts.double() / max(float(counts.sum()), 1.0)
    nonzero = share[share > 0]
    kl = float((nonzero * (nonzero * modes).log()).sum()) if len(nonzero) else math.nan
    return int((counts >= n_samples / (3 * modes)).sum()), kl


def image_metrics(probs, features, test_stats):
    """Class histogram, modes covered, KL to uniform, classifier score, confidence and Frechet distance."""
    counts = torch.bincount(probs.argmax(1), minlength=10).cpu()
    covered, kl = coverage(counts, len(probs))
    marginal = probs.mean(0, keepdim=True)
    score = torch.exp((probs * (probs.clamp_min(1e-12).log() - marginal.log())).sum(1).mean()).item()
    fd = frechet_distance(feature_stats(features), test_stats)
    return {'modes': covered, 'modes_captured': math.nan, 'kl': kl, 'score': score,
            'confidence': probs.max(1).values.mean().item(), 'fd': fd, 'high_quality': math.nan,
            'histogram': (counts.double() / len(probs)).tolist()}


def stacked_metrics(model, pixels, test_stats, sure=0.9):
    """Stacked MNIST as published (PacGAN's code, VEEGAN's Table 2): each channel's digit by the classifier; modes:
    the distinct triples (one sample makes one); KL(the triples' histogram || uniform over 1,000). Also the modes of
    the samples whose three channels all get at least `sure` (modes_captured), their share (high_quality), and the
    Frechet distance of the channels' features to MNIST's test digits'."""
    model = model.to(memory_format=torch.channels_last)  # its convolutions so: twice as fast on the CPU, same digits
    probs, features = classify(model, pixels.reshape(-1, 784))
    best, digits = probs.max(1)
    triples = (digits.view(-1, 3).cpu() * torch.tensor([100, 10, 1])).sum(1)
    confident = (best.view(-1, 3) >= sure).all(1).cpu()
    counts = torch.bincount(triples, minlength=1000)
    fd, kl = frechet_distance(feature_stats(features), test_stats), coverage(counts, len(triples))[1]
    return {'modes': int((counts > 0).sum()), 'modes_captured': len(triples[confident].unique()), 'kl': kl,
            'score': math.nan, 'confidence': best.mean().item(), 'fd': fd,
            'high_quality': confident.double().mean().item(), 'histogram': (counts.double() / len(triples)).tolist()}


def mixture_metrics(points, dataset, real_stats):
    """2-D samples: the share of high-quality samples (within 3 std of their nearest mode), the modes captured (the
    nearest mode of a high-quality sample), modes covered and KL of the high-quality histogram, Frechet distance."""
    centres, std = mixture(dataset)
    distance, nearest = torch.cdist(points.double().cpu(), centres.double()).min(1)
    close = distance <= 3 * std
    counts = torch.bincount(nearest[close], minlength=len(centres))
    covered, kl = coverage(counts, len(points))
    return {'modes': covered, 'modes_captured': int((counts > 0).sum()), 'kl': kl, 'score': math.nan,
            'confidence': math.nan, 'fd': frechet_distance(feature_stats(points.cpu()), real_stats),
            'high_quality': close.double().mean().item(), 'histogram': (counts.double() / len(points)).tolist()}


@contextmanager
def evaluating(*sides):
    """The sides' networks in eval mode (dropout off), then back to training."""
    for side in sides:
        side.model.eval()
    try:
        yield
    finally:
        for side in sides:
            side.model.train()


@torch.no_grad()
def generate(pairs, z, y):
    """Each generator's samples of the noise z and labels y (1, batch), (n_pairs, batch, x_dim): draw_samples's, in
    eval mode."""
    with evaluating(*pairs.values()):
        return draw_samples(pairs, z, y)


@torch.no_grad()
def cross_scores(pairs, samples, y):
    """The paper's cross-scoring: scores[d, g] = mean D_d(G_g(z)), d by slot, g by samples' order; y: the labels the
    samples were drawn for (1, batch)."""
    with evaluating(*pairs.values()):
        return torch.stack([torch.sigmoid(score_inputs(pairs, s[None], y)).mean((1, 2)) for s in samples],
                           1).double().cpu()


@torch.no_grad()
def judge_real(pairs, points, labels, chunk=1000):
    """Each discriminator's mean D(x) and accuracy (D > 0.5) on real points (N, x_dim) with their labels (N,), in
    slot order."""
    with evaluating(*pairs.values()):
        like = next(pairs['D'].model.parameters())  # the runs --compare pools may differ in dtype
        prob = torch.cat([torch.sigmoid(score_inputs(pairs, part.to(like)[None], y.to(like.device)[None]))
                          for part, y in zip(points.split(chunk), labels.split(chunk))], 1)
    return prob.mean((1, 2)).double().cpu(), (prob > 0.5).double().mean((1, 2)).cpu()


METRIC_COLUMNS = ('iteration', 'generator', 'modes', 'modes_captured', 'kl', 'score', 'confidence', 'fd',
                  'high_quality', 'pool_mean', 'pool_worst', 'd_train', 'd_heldout', 'd_gap', 'd_train_acc',
                  'd_heldout_acc', 'd_acc_gap', 'histogram', 'd_scores')


class Evaluator:
    """Scores every generator and discriminator; what an edited network cannot take leaves its columns nan."""

    def __init__(self, cfg, dev, dtype, train_data, train_labels):
        self.cfg, self.dev, self.dtype, self.cannot = cfg, dev, dtype, set()
        if cfg['dataset'] in MIXTURES:
            self.classifier = None
            self.reference = feature_stats(sample_mixture(cfg['dataset'], cfg['eval_samples'], seed=54321)[0])
        else:  # the classifier learns from the whole training set, whatever train_size the GANs see
            self.classifier, self.reference = load_classifier(cfg, dev, train_data, train_labels)
        seen, self.labels = used_for_training(train_data, cfg), used_for_training(train_labels, cfg).to(dev)
        heldout, heldout_labels = held_out_data(cfg, min(cfg['eval_samples'], len(seen)))
        real = {'train': (seen[:len(heldout)], self.labels[:len(heldout)]), 'heldout': (heldout, heldout_labels)}
        self.real = {split: (as_inputs(x.to(dev), dtype), y.to(dev)) for split, (x, y) in real.items()}

    def generator_metrics(self, samples):
        """Coverage and quality of one generator's samples (N, x_dim)."""
        if self.classifier is None:
            return mixture_metrics(samples.cpu(), self.cfg['dataset'], self.reference)
        if self.cfg['dataset'] == STACKED:
            return stacked_metrics(self.classifier, as_unit_pixels(samples), self.reference)
        return image_metrics(*classify(self.classifier, as_unit_pixels(samples)), self.reference)

    def samples(self, pairs, it):
        """eval_samples samples of every generator, by the pair it started in, (n_pairs, eval_samples, x_dim), and
        the labels they were drawn for (1, eval_samples), drawn as often as the training set has each."""
        G, seed = pairs['G'], self.cfg['seed'] * 1_000_003 + it  # not training's noise
        rng, label_rng = (torch.Generator(device=self.dev).manual_seed(seed + k) for k in (7, 8))
        y = self.labels[torch.randint(len(self.labels), (self.cfg['eval_samples'],), generator=label_rng,
                                      device=self.dev)][None]
        chunks = [generate(pairs, to_slots(draw_noise(self.cfg, part.shape[1], rng, self.dtype), G), part)
                  for part in y.split(1000, 1)]
        return torch.cat(chunks, 1)[[G.origin.index(g) for g in range(len(G.origin))]], y

    def pool(self, pairs, samples, y):
        """scores[d, g]: discriminator d's mean output on generator g's samples, both by the pair they started in."""
        scores = torch.empty(len(pairs['D'].origin), len(samples), dtype=torch.float64)
        parts = zip(samples.split(1000, 1), y.split(1000, 1))
        scores[pairs['D'].origin] = sum(cross_scores(pairs, x, y) * x.shape[1] for x, y in parts) / samples.shape[1]
        return scores

    def judged(self, pairs):
        """How each discriminator (by the pair it started in) judges real training and held-out examples."""
        judged, D = {}, pairs['D']
        for split, (points, labels) in self.real.items():
            for key, in_slots in zip((f'd_{split}', f'd_{split}_acc'), judge_real(pairs, points, labels)):
                judged[key] = torch.empty_like(in_slots)
                judged[key][D.origin] = in_slots
        judged['d_gap'] = judged['d_train'] - judged['d_heldout']
        judged['d_acc_gap'] = judged['d_train_acc'] - judged['d_heldout_acc']
        return judged

    def __call__(self, pairs, it):
        """One row per generator, and the discriminator that started in its pair, by the pair they started in."""
        G = pairs['G']
        rows = [{'iteration': it, 'generator': g + 1, **dict.fromkeys(METRIC_COLUMNS[2:-2], math.nan)}
                for g in range(len(G.origin))]
        drawn = attempt('measure the generators (their samples)', lambda: self.samples(pairs, it), self.cannot,
                        'draw_samples')
        if drawn is not None:
            samples, y = drawn
            for row, mine in zip(rows, samples):
                metrics = attempt('measure coverage and quality', lambda: self.generator_metrics(mine), self.cannot)
                row.update(metrics or {})
            scores = attempt('measure the pool of discriminators', lambda: self.pool(pairs, samples, y), self.cannot,
                             'score_inputs')
            for g, row in enumerate(rows if scores is not None else []):
                row.update(pool_mean=scores[:, g].mean().item(), pool_worst=scores[:, g].min().item(),
                           d_scores=scores[:, g].tolist())
        judged = attempt('measure the discriminators on real data', lambda: self.judged(pairs), self.cannot,
                         'score_inputs')
        for g, row in enumerate(rows if judged is not None else []):
            row.update({key: value[g].item() for key, value in judged.items()})
        return rows


def attempt(what, f, said, calls=''):
    """f(), or, where an edited network cannot take what it is given, None and one line saying so (once: said),
    naming the function of the algorithm part that calls the networks there (calls)."""
    try:
        return f()
    except RuntimeError as error:  # torch's word for inputs an edited network cannot take (shapes, dtypes): the
        # run goes on, measuring what it still can; a slip in the code (a KeyError, a NameError) stops it
        if what not in said:
            said.add(what)
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            edit = f' (edit {calls}() to give the networks what they take)' if calls else ''
            procs.say(f'cannot {what}: {reason}{edit}')


# ------------------------------------------------------------------------------------
# comparing runs: every generator judged by one pool of discriminators from every run (the paper's GAM-II)

def find_runs(folder):
    """(name, checkpoint) of every readable checkpoint.pt in or below folder, if the runs can share a pool."""
    paths = sorted(glob.glob(os.path.join(folder, '**', 'checkpoint.pt'), recursive=True))
    if not paths:
        missing = '' if os.path.isdir(folder) else ' (no such folder)'
        refuse(f'--compare={folder}: no checkpoint.pt in or below it{missing}')
    defaults, runs, damaged = {name: default for name, default, _ in read_block()}, [], []
    for path in paths:
        try:
            state = torch.load(path, map_location='cpu', weights_only=True)
            state['hyperparameters'] = {**defaults, **state['hyperparameters']}
            state['pairs']['D']['model']  # a checkpoint of this script
            runs.append((os.path.relpath(os.path.dirname(path), folder), state))
        except Exception as error:
            damaged.append(f'{path} ({type(error).__name__})')
    if not runs:
        refuse(f'--compare={folder}: none of its {len(paths)} checkpoint(s) could be read: {", ".join(damaged)}')
    for path in damaged:
        print(f'{SCRIPT_NAME}: warning: skipping {path}: damaged or not a checkpoint of this script', file=sys.stderr)
    values = {key: sorted({repr(state['hyperparameters'][key]) for _, state in runs}) for key in POOL_KEYS}
    differ = [f'{key} ({" vs ".join(v)})' for key, v in values.items() if len(v) > 1]
    if differ:
        refuse(f'--compare={folder}: these runs cannot share a pool of discriminators, they differ in '
               f'{", ".join(differ)}')
    return runs


def configurations(runs):
    """Each run's configuration: the hyperparameters in which the runs differ (but seeds_alike), and its code."""
    keys = [k for k in runs[0][1]['hyperparameters'] if not seeds_alike(k)
            and len({repr(state['hyperparameters'][k]) for _, state in runs}) > 1]
    configs = [' '.join(f'{k}={state["hyperparameters"][k]}' for k in keys) for _, state in runs]
    codes = [state.get('code') for _, state in runs]
    versions = [repr(sorted(code.items())) if code else 'unknown' for code in codes]
    if len(set(versions)) > 1:
        first = list(dict.fromkeys(versions))
        print(f'these runs were trained by {len(first)} versions of the code; each is its own configuration '
              f'(code=1 to {len(first)}): {code_differences(codes[0], next(c for c in codes if c != codes[0]) or {})}')
        configs = [f'{c} code={first.index(v) + 1}'.strip() for c, v in zip(configs, versions)]
    return [c or 'all runs' for c in configs]


def pool_errors(runs_pairs, noises, y):
    """errors[d, g]: the share of generator g's samples (drawn for the labels y) that discriminator d takes for
    real, slot by slot."""
    columns = []
    for pairs, z in zip(runs_pairs, noises):  # made 1000 at a time, as batch norm sees them in the evaluation
        samples = torch.cat([generate(pairs, part, labels[None]) for part, labels in zip(z.split(1000, 1),
                                                                                         y.split(1000))], 1)
        columns += [torch.cat([judge_real(judges, s, y)[1] for judges in runs_pairs]) for s in samples]
    return torch.stack(columns, 1)


def print_table(title, keys, rows, configs):
    """A markdown table of mean ± std over the runs of each configuration, one row of keys per run."""
    print(f'{title}\n| configuration | runs | ' + ' | '.join(keys) + ' |\n' + '|---' * (2 + len(keys)) + '|')
    table = []
    for config in dict.fromkeys(configs):
        mine = torch.tensor([[row[k] for k in keys] for row, c in zip(rows, configs) if c == config],
                            dtype=torch.float64)
        mean, spread = mine.mean(0), mine.std(0) if len(mine) > 1 else torch.zeros(len(keys), dtype=torch.float64)
        table.append({'configuration': config, 'runs': len(mine)})
        for key, m, s in zip(keys, mean.tolist(), spread.tolist()):
            table[-1].update({key: m, key + '_std': s})
        print(f'| {config} | {len(mine)} | ' + ' | '.join(f'{m:.3f} ± {s:.3f}' for m, s in zip(mean, spread)) + ' |')
    return table


def compare_runs(cfg):
    """--compare=folder: score every generator of every run with the pool of every run's discriminators (GAM-II)."""
    folder, dev = cfg['compare'], pick_device(cfg['device'])
    if cfg['threads']:
        torch.set_num_threads(cfg['threads'])
    runs = find_runs(folder)
    configs = configurations(runs)
    runs_pairs, noises = [], []
    for name, state in runs:  # each run's sides, and the noise of the compare's seed as its generators take it
        hp, dtype = state['hyperparameters'], getattr(torch, state['hyperparameters']['dtype'])
        x_dim = 2 if hp['dataset'] in MIXTURES else 3 * 784 if hp['dataset'] == STACKED else 784
        pairs = make_pairs(hp, x_dim, dev, dtype)
        load_pairs(pairs, state['pairs'], os.path.join(folder, name, 'checkpoint.pt'))
        runs_pairs.append(pairs)
        z = draw_noise(hp, cfg['eval_samples'], torch.Generator().manual_seed(cfg['seed']), dtype)
        noises.append(to_slots(z, pairs['G']).to(dev))
    Gs, Ds = [pairs['G'] for pairs in runs_pairs], [pairs['D'] for pairs in runs_pairs]
    real, labels = held_out_data(runs[0][1]['hyperparameters'], cfg['eval_samples'])
    y = labels[torch.arange(cfg['eval_samples']) % len(labels)].to(dev)  # the labels every generator draws for
    run_of = torch.tensor([r for r, G in enumerate(Gs) for _ in G.origin])  # each slot's run
    print(f'comparing {len(runs)} runs ({len(run_of)} generators, as many discriminators) '
          f'on {cfg["eval_samples"]} samples per generator', flush=True)
    try:
        errors = pool_errors(runs_pairs, noises, y)
        real_error = torch.cat([1 - judge_real(pairs, as_inputs(real.to(dev), noise.dtype), labels.to(dev))[1]
                                for pairs, noise in zip(runs_pairs, noises)])
    except RuntimeError as error:  # an edited network that does not take a sample alone
        refuse(f'--compare={folder}: cannot score the samples ({str(error).strip().splitlines()[0]}); the networks are '
               f'called through draw_samples() and score_inputs(): edit them to give the networks what they take')
    names = [(f'{runs[r][0]}:G{g + 1}', f'{runs[r][0]}:D{d + 1}')  # slot by slot: the networks each holds
             for r, (G, D) in enumerate(zip(Gs, Ds)) for g, d in zip(G.origin, D.origin)]
    write_comparison(folder, errors, real_error, names, run_of, configs)
    best_of_runs(cfg, runs[0][1]['hyperparameters'], errors, run_of, runs_pairs, noises, y, names, configs)
    return 0


def write_comparison(folder, errors, real_error, names, run_of, configs):
    """compare.csv (by configuration, also printed), compare_generators.csv, compare_matrix.csv and compare.png."""
    slot_of = {d: slot for slot, (_, d) in enumerate(names)}  # 'run:Dk' -> its row (slot) in errors
    others = run_of[:, None] != run_of[None]  # others[d, g]: discriminator d is of another run than generator g
    per_generator, per_run = [], []
    for g, (name, _) in enumerate(names):
        run, k = name.rsplit(':G', 1)
        d = slot_of[f'{run}:D{k}']
        per_generator.append([run, k, *(f'{v:.6g}' for v in (errors[:, g].mean().item(),
                                                              errors[others[:, g], g].mean().item(),
                                                              errors[d].mean().item(), real_error[d].item()))])
    for r in range(len(configs)):
        mine, g = run_of == r, errors[:, run_of == r]
        g_others = g[~mine] if len(configs) > 1 else torch.full((1, int(mine.sum())), math.nan, dtype=torch.float64)
        per_run.append({'g_mean': g.mean().item(), 'g_worst': g.min(0).values.mean().item(),
                        'g_mean_others': g_others.mean().item(), 'g_worst_others': g_others.min(0).values.mean().item(),
                        'd_fake_error': errors[mine].mean().item(), 'd_real_error': real_error[mine].mean().item()})
    table = print_table('error rate = share of samples a discriminator takes for real (fakes) or for fake (real '
                        'test data);\ngenerators: mean and worst (lowest) over the pool, and over other runs\' '
                        'discriminators only', list(per_run[0]), per_run, configs)
    write_csv(os.path.join(folder, 'compare.csv'), list(table[0]), table)
    write_csv(os.path.join(folder, 'compare_generators.csv'),
              ['run', 'generator', 'pool_error', 'pool_error_others', 'd_fake_error', 'd_real_error'], per_generator)
    write_csv(os.path.join(folder, 'compare_matrix.csv'), ['discriminator \\ generator', *(g for g, _ in names)],
              [[d, *(f'{v:.4g}' for v in row.tolist())] for (_, d), row in zip(names, errors)])
    save_comparison_plot(os.path.join(folder, 'compare.png'), errors, [configs[int(r)] for r in run_of])
    print(f'wrote {folder}/compare.csv, compare_generators.csv, compare_matrix.csv and compare.png')


def best_of_runs(cfg, hp, errors, run_of, runs_pairs, noises, y, names, configs):
    """Algorithm 1's "select the best GAN": each run's generator that fools the other runs' discriminators most
    (a lone run's, its own), with its own metrics: printed by configuration and written to compare_best.csv."""
    judges = (run_of[:, None] != run_of[None]) | (len(configs) == 1)  # judges[d, g]: d judges g
    fooled = torch.stack([errors[judges[:, g], g].mean() for g in range(len(run_of))])
    evaluator = Evaluator({**hp, **{k: cfg[k] for k in ('data_root', 'classifier_dir', 'eval_samples')}},
                          noises[0].device, noises[0].dtype, *training_data({**hp, 'data_root': cfg['data_root']}))
    rows = []
    for r, (pairs, z) in enumerate(zip(runs_pairs, noises)):
        columns = (run_of == r).nonzero().flatten()
        best = int(columns[fooled[columns].argmax()])
        metrics = evaluator.generator_metrics(generate(pairs, z, y[None])[best - int(columns[0])])
        rows.append({'run': names[best][0], 'configuration': configs[r], 'pool_error': fooled[best].item(),
                     **{k: v for k, v in metrics.items() if k != 'histogram'}})
    keys = [k for k in ('pool_error', 'modes', 'modes_captured', 'high_quality', 'score', 'fd')
            if all(math.isfinite(row[k]) for row in rows)]
    print_table('the best generator of each run (by the pool): its error rate over the other runs\' discriminators, '
                'and its own metrics', keys, rows, configs)
    write_csv(os.path.join(cfg['compare'], 'compare_best.csv'), list(rows[0]), rows)
    print(f'wrote {cfg["compare"]}/compare_best.csv')


# ------------------------------------------------------------------------------------
# pictures

DPI = 80  # pixels per inch of every PNG


def pyplot():
    """matplotlib's pyplot, drawing to files only (no display needed)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    """A figure as a PNG file, written whole or not at all."""
    try:
        with replacing(path) as tmp:
            fig.savefig(tmp, dpi=DPI, format='png')
    finally:
        pyplot().close(fig)


def save_samples(path, samples, it, partners, real=None, row_labels=None):
    """Each generator's samples (G1, G2, ...), with its discriminator now (partners[i]): 16 images drawn 3x as a
    4x4 grid (Stacked MNIST's three channels as RGB), or 2-D points over the real ones. row_labels: the class each
    row of a grid asks for (a conditional GAN's), written left of it."""
    plt = pyplot()
    n = len(samples)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    if real is None:  # laid out in pixels: a grid of 118 x 118 pixels shown at 3x, with room for its title
        side, pad, title, top = 3 * (4 * 30 - 2), 9, 22, 26
        width, height = cols * (side + 2 * pad), top + rows * (title + side + pad)
        fig = plt.figure(figsize=(width / DPI, height / DPI))
        corners = [((c * (side + 2 * pad) + pad) / width, 1 - (top + r * (title + side + pad) + title + side) / height)
                   for r in range(rows) for c in range(cols)]
        axes = [fig.add_axes((x, y, side / width, side / height)) for x, y in corners]
    else:
        fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), squeeze=False)
        axes = axes.flat
    for ax in axes:
        ax.axis('off')
    for i, points in enumerate((samples if real is not None else as_unit_pixels(samples)).cpu().float()):
        ax = axes[i]
        if real is None:
            channels = points.shape[-1] // 784  # 3: Stacked MNIST, in colour
            grid = torch.ones(4 * 30 - 2, 4 * 30 - 2, channels)
            for k, image in enumerate(points[:16].reshape(16, channels, 28, 28).permute(0, 2, 3, 1)):
                grid[30 * (k // 4):30 * (k // 4) + 28, 30 * (k % 4):30 * (k % 4) + 28] = image
            ax.imshow(grid.squeeze(2).numpy(), cmap='Greys_r', vmin=0, vmax=1,
                      interpolation='nearest')  # [0, 1]: as_unit_pixels
            for r, label in enumerate(row_labels or []):
                ax.text(-0.01, 1 - (30 * r + 14) / (4 * 30 - 2), str(label), transform=ax.transAxes, ha='right',
                        va='center', fontsize=9)
        else:
            ax.scatter(*real[:2000].T.numpy(), s=1, c='lightgrey')
            ax.scatter(*points.T.numpy(), s=1, c='C3')
            reach = 1.25 * float(real.abs().max())
            ax.set(xlim=(-reach, reach), ylim=(-reach, reach), aspect='equal')
        ax.set_title(f'G{i + 1}' + (f' (with D{partners[i] + 1})' if n > 1 else ''), fontsize=11, pad=4)
    fig.suptitle(f'iteration {it}', **({'y': 1 - 4 / height, 'va': 'top', 'fontsize': 12} if real is None else {}))
    save_figure(fig, path)


def save_comparison_plot(path, errors, config_of_column):
    """The (discriminator x generator) error-rate matrix as a heatmap, runs of one configuration side by side."""
    order = sorted(range(len(config_of_column)), key=lambda i: config_of_column[i])
    labels = [config_of_column[i] for i in order]
    size = min(4 + 0.12 * len(order), 16)
    fig, ax = pyplot().subplots(figsize=(size + 2, size))
    image = ax.imshow(errors[order][:, order].numpy(), cmap='viridis', vmin=0, vmax=max(float(errors.max()), 1e-3))
    fig.colorbar(image, ax=ax, label='share of the generator\'s samples taken for real')
    starts = [i for i in range(len(labels)) if i == 0 or labels[i] != labels[i - 1]]
    for i in starts[1:]:
        ax.axhline(i - 0.5, color='white', lw=1)
        ax.axvline(i - 0.5, color='white', lw=1)
    centres = [(a + b - 1) / 2 for a, b in zip(starts, starts[1:] + [len(labels)])]
    ax.set_xticks(centres, [labels[i] for i in starts], rotation=30, ha='right', fontsize=8)
    ax.set_yticks(centres, [labels[i] for i in starts], fontsize=8)
    ax.set(xlabel='generators', ylabel='discriminators',
           title='GAM-II: error rate of every discriminator on every generator')
    fig.tight_layout()
    save_figure(fig, path)


def swaps_title(swaps, moved):
    """losses.png's title: how many swaps, and of which side's networks ('D', 'G' or both in moved)."""
    what = {'D': 'discriminators', 'G': 'generators'}.get(''.join(sorted(moved)), 'generators and discriminators')
    if not swaps:
        return 'no swaps'
    return f'{len(swaps)} swaps of {what}' + (' (grey lines)' if len(swaps) <= 100 else ', too dense to draw')


def save_losses(path, history, swaps, moved='D', most=2000, long=200):
    """Each pair's *_loss statistics per log line (each over the lines that have it: an edit may add one), and the
    swaps: at most `most` points a curve; beyond `long`, faint under a moving median, in the y range of the bulk."""
    names = list(dict.fromkeys(name for row in history for name in row if name.endswith('_loss')))
    if not names:
        return
    from matplotlib.ticker import EngFormatter
    fig, axes = pyplot().subplots(len(names), 1, figsize=(9, 3 * len(names)), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        rows = [row for row in history if name in row]
        its = torch.tensor([row['iteration'] for row in rows], dtype=torch.float64)
        values = torch.tensor([row[name] for row in rows], dtype=torch.float64)  # (log lines, pairs)
        faint = 'every log line' if len(its) <= most else f'means of {len(its) / most:.3g} log lines'
        if len(its) > most:  # consecutive rows averaged into `most` bins
            bins = torch.arange(len(its)) * most // len(its)
            count = torch.bincount(bins, minlength=most).double()
            its = torch.zeros(most, dtype=its.dtype).index_add_(0, bins, its) / count
            values = torch.zeros(most, values.shape[1], dtype=values.dtype).index_add_(0, bins, values) / count[:, None]
        smooth, window = len(its) > long, max(len(its) // 50, 2)
        for i, pair in enumerate(values.T):
            ax.plot(its.numpy(), pair.numpy(), color=f'C{i}', lw=0.5 if smooth else 1, alpha=0.35 if smooth else 1,
                    label=None if smooth else f'pair {i + 1}')
            if smooth:  # a centred moving median: a lone spike does not move it
                medians = pair.unfold(0, window, 1).median(1).values
                ax.plot(its[window // 2:window // 2 + len(medians)].numpy(), medians.numpy(), color=f'C{i}', lw=1.6,
                        label=f'pair {i + 1}')
        off = 0
        if smooth:
            every = values.flatten()
            low, high = torch.quantile(every, torch.tensor([0.005, 0.995], dtype=every.dtype)).tolist()
            low, high = low - 0.1 * (high - low + 1e-9), high + 0.1 * (high - low + 1e-9)
            ax.set_ylim(low, high)
            off = int(((every < low) | (every > high)).sum())
        if len(swaps) <= 100:
            ax.vlines(swaps, 0, 1, transform=ax.get_xaxis_transform(), colors='grey', alpha=0.3, lw=0.8)
        ax.set_ylabel(name + (f' ({off} off the scale)' if off else ''))
        ax.legend(loc='upper right', fontsize=8)
    smoothed = f' (faint: {faint}; bold: their moving median over {window})' if smooth else ''
    axes[-1, 0].set_xlabel('iteration' + smoothed)
    axes[-1, 0].xaxis.set_major_formatter(EngFormatter(sep=''))
    axes[0, 0].set_title(swaps_title(swaps, moved))
    fig.tight_layout()
    save_figure(fig, path)


def save_metrics_plot(path, rows):
    """Modes covered, KL and Frechet distance per generator, and each discriminator's mean D(x) on real training
    and held-out data, over the run; large markers while there are few (a single one has no line to show it)."""
    fig, axes = pyplot().subplots(1, 4, figsize=(17, 3.6))
    panels = (('modes', 'modes covered'), ('kl', 'KL(histogram || uniform)'), ('fd', 'Frechet distance'))
    for g in sorted({int(r['generator']) for r in rows}):
        mine = [r for r in rows if int(r['generator']) == g]
        its = [int(r['iteration']) for r in mine]
        ms = 7 if len(its) <= 30 else 3
        for ax, (key, name) in zip(axes, panels):
            ax.plot(its, [float(r[key]) for r in mine], marker='o', ms=ms, label=f'G{g}')
            ax.set(title=name, xlabel='iteration')
        for key, style, fill, what in (('d_train', '-', 'full', 'train'), ('d_heldout', '--', 'none', 'held-out')):
            axes[3].plot(its, [float(r[key] or 'nan') for r in mine], style, color=f'C{g - 1}', marker='o', ms=ms,
                         fillstyle=fill, label=f'D{g} {what}')
    axes[3].set(title='mean D(x): train (filled), held-out (open)', xlabel='iteration')
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


# ------------------------------------------------------------------------------------
# the run

def evaluates_at(it, cfg):
    """Every eval_every iterations, and the last one of a run that reached one of those (or with eval_at_end)."""
    every, last = cfg['eval_every'], cfg['iterations'] - 1
    return bool(every and it % every == 0 and it > 0 or it == last and (cfg['eval_at_end'] or every and last >= every))


def write_metrics(path, rows, keep_until):
    """metrics.csv: its rows up to iteration keep_until (a resumed run redoes later ones), then rows."""
    old = [row for row in read_csv(path) if int(row['iteration']) <= keep_until] if os.path.exists(path) else []
    write_csv(path, METRIC_COLUMNS, old + rows)


class Recorder:
    """A run, fresh or from its checkpoint's state: what a resume must find as it was (state_dict), and what the run
    shows and writes after each iteration (the leader process alone writes); a Ctrl-C ends it after a checkpoint."""

    def __init__(self, cfg, dev, images, labels, state, interrupted):
        # seeding: one seed, one stream per purpose, the same in every process: the weights from torch's global
        # generator, the data order seed + 1 (each pair's own, with own_noise), the noise and the input noise
        # seed + 2, the fixed noise of the sample grids seed + 3, each swap's pairing the seed and its iteration
        seed, dtype, self.cfg, self.interrupted = cfg['seed'], getattr(torch, cfg['dtype']), cfg, interrupted
        torch.manual_seed(seed)
        self.data = make_batches(used_for_training(images, cfg).to(dev), used_for_training(labels, cfg).to(dev), cfg,
                                 seed + 1, dtype)
        try:
            self.pairs = make_pairs(cfg, images.shape[1], dev, dtype)
        except ValueError as error:
            refuse(f'cannot build the networks: {error}')
        if cfg.get('same_init'):  # every side's networks, an edit's own sides too
            start_alike(self.pairs)
        flat = [f'{name}.{k}' for name, side in self.pairs.items() for k, t in
                (*side.model.named_parameters(), *side.model.named_buffers()) if t.shape[:1] != (cfg['n_pairs'],)]
        if flat:
            refuse(f'{", ".join(flat)} has no leading pairs dimension: every weight of the networks is (n_pairs, ...); '
                   f'use Linear, SpectralLinear (spectral norm per pair), BatchNorm, or PerPair(n, lambda: your_layer)')
        self.noise_rng = torch.Generator(device=dev).manual_seed(seed + 2)
        self.iteration, self.swaps, self.moved = -1, [], set()  # the last iteration done, the swaps, the sides moved
        self.grids = 0  # the sample grids written on schedule: the next grid's number (000.png, 001.png, ...)
        self.history, self.names, self.recent = [], [], []  # a row of means per log line; the steps' since the last
        if state:
            self.load_state_dict(state)
        self.share = share_of_process(self.pairs, cfg, images.shape[1])  # under torchrun, this process's pairs
        self.origins, self.said = [side.origin for side in self.share.values()], set()
        self.start = self.since = self.iteration + 1  # this process's first iteration: a warm-up, left untimed
        self.real = images[:2000] if cfg['dataset'] in MIXTURES else None  # drawn under 2-D samples
        self.fixed_z = draw_noise(cfg, 16 if self.real is None else 1000, torch.Generator().manual_seed(seed + 3),
                                  torch.float32).to(dev, dtype)  # the same latent points in every sample grid
        classes = int(labels.max()) + 1  # the labels a conditional GAN's grid asks for: images, a class per row
        self.fixed_y = (torch.arange(16) // 4 % classes if self.real is None else torch.arange(1000) % classes)
        self.fixed_y = self.fixed_y.to(dev, labels.dtype)[None]
        self.classes, self.conditional = classes, None  # whether the samples depend on the labels: at the first grid
        last, every = cfg['iterations'] - 1, cfg['sample_every']  # the last grid's number: as wide as every name
        self.digits = max(3, len(str(self.grids + last // every - self.iteration // every - (last % every == 0))))
        evaluates = evaluates_at(cfg['iterations'] - 1, cfg)  # the last iteration does, when any does
        self.evaluator = Evaluator(cfg, dev, dtype, images, labels) if evaluates and procs.leader else None
        if self.evaluator:  # a fresh run starts a fresh file; a resumed one redoes the evaluations after its checkpoint
            write_metrics(self.path('metrics.csv'), [], keep_until=self.iteration)

    def state_dict(self, unlogged):
        """What a checkpoint keeps; unlogged: every pair's statistics since the last log line."""
        log = {'history': self.history, 'names': self.names, 'recent': unlogged.cpu()}
        return {'hyperparameters': self.cfg, 'block': block_values, 'code': algorithm_code(),
                'device': self.noise_rng.device.type, 'iteration': self.iteration, 'swaps': self.swaps,
                'moved': sorted(self.moved), 'grids': self.grids, 'log': log, 'noise_rng': self.noise_rng.get_state(),
                'data': self.data.state_dict(), 'pairs': {name: side.state_dict() for name, side in self.pairs.items()}}

    def load_state_dict(self, state):
        """Go on from a checkpoint's state (load_checkpoint's), or refuse other networks; says so with the changes."""
        path, saved, recent = checkpoint_path(self.cfg), state['hyperparameters'], state['log']['recent']
        load_pairs(self.pairs, state['pairs'], path)
        self.noise_rng.set_state(state['noise_rng'])
        self.data.load_state_dict(state['data'])
        self.iteration, self.swaps, self.moved = state['iteration'], state['swaps'], set(state['moved'])
        self.grids = state.get('grids', self.iteration // saved['sample_every'] + 1)  # (older checkpoints: by count)
        self.history, self.names = state['log']['history'], state['log']['names']
        self.recent = list((recent[:, procs.slots] if procs.world > 1 and len(recent) else recent).to(procs.device))
        changes = '; '.join(f'{k}={saved[k]!r} there, {self.cfg[k]!r} now' for k in self.cfg
                            if resumable(k) and k != 'resume' and k in saved and saved[k] != self.cfg[k])
        procs.say(f'resumed from {path} after iteration {self.iteration}, '
                  + (f'with these changes: {changes}' if changes else 'with its own hyperparameters'))

    def path(self, name):
        return os.path.join(self.cfg['out_dir'], name)

    def after(self, it, stats):
        """Record iteration it's statistics; log, evaluate and save on schedule. True: interrupted, and saved."""
        cfg, last = self.cfg, self.cfg['iterations'] - 1
        names = list(stats)
        if names != self.names and self.recent:  # an edit resumed changed the statistics: the old ones' line first
            self.log(it - 1)
        if it == self.start:  # the speed counts from here: not the set-up, nor the first iteration's warm-up
            self.clock, self.since = time.perf_counter(), it + 1
        self.iteration, self.names = it, names
        self.recent.append(statistics_of_pairs(stats, len(procs.slots) if procs.world > 1 else cfg['n_pairs']))
        origins = [side.origin for side in self.share.values()]
        if origins != self.origins:  # a swap moved the networks of a side, and their origins with them
            self.swaps.append(it)
            self.moved.update(name for name, now, then in zip(self.share, origins, self.origins) if now != then)
            self.origins = origins
        logging = it % cfg['log_every'] == 0 or it == last
        stopping = procs.anyone(self.interrupted) if logging or procs.world == 1 else False  # all processes agree
        if logging:
            self.log(it)
        evaluating, saving = evaluates_at(it, cfg), it % cfg['sample_every'] == 0 or it == last or stopping
        if evaluating or saving:
            began = time.perf_counter()
            unlogged = self.unlogged(it)
            collect_pairs(self.pairs, self.share)  # under torchrun: every pair, in every process
            if evaluating:  # before the checkpoint: a resume from an earlier one redoes it
                self.evaluate(it)
            if saving:
                self.save(it, unlogged)
            self.clock += time.perf_counter() - began  # the speed is training's alone
        if stopping:
            procs.say(f'interrupted: checkpoint saved after iteration {it}; continue with --resume=True')
        if stopping or it == last:
            self.losses()
        return stopping

    def unlogged(self, it):
        """Every pair's statistics since the last log line (every process calls it); a non-finite one stops the run."""
        unlogged = procs.gather(torch.stack(self.recent), dim=1) if self.recent else torch.zeros(0, 0, len(self.names))
        bad = (~torch.isfinite(unlogged)).any(2).nonzero()
        if len(bad):
            self.stop(f'a statistic of pair {int(bad[0, 1]) + 1} became non-finite at iteration '
                      f'{it - len(unlogged) + 1 + int(bad[0, 0])}')
        return unlogged

    def log(self, it):
        """A log line: each statistic of every pair (1/2/...) as means since the previous line, and the speed."""
        unlogged, now = self.unlogged(it), time.perf_counter()
        rate = (it + 1 - self.since) / max(now - self.clock, 1e-9) if it > self.start else None
        self.clock, self.since = now, it + 1
        means = dict(zip(self.names, unlogged.double().mean(0).T.cpu().tolist()))
        self.history.append({'iteration': it, **means})
        self.recent = []
        columns = ' | '.join(f'{name} {"/".join(f"{v:.3f}" for v in values)}' for name, values in means.items())
        minutes, seconds = divmod(int((self.cfg['iterations'] - 1 - it) / max(rate or 1, 1e-9)), 60)
        eta = f'{minutes // 60}h{minutes % 60:02d}m' if minutes >= 60 else f'{minutes}m{seconds:02d}s'
        untimed = 'first iteration' if it == self.start else 'saved before the resume'  # (an edit's old statistics)
        speed = untimed if rate is None else f'{rate:.0f} it/s, {eta} left'
        procs.say(f'it {it:>7} | {columns} | {speed}')

    def evaluate(self, it):
        """Score every generator and discriminator (the leader's copy of every pair must be up to date)."""
        if not self.evaluator:
            return
        rows = self.evaluator(self.pairs, it)
        write_metrics(self.path('metrics.csv'), rows, keep_until=it - 1)
        save_metrics_plot(self.path('metrics.png'), read_csv(self.path('metrics.csv')))
        join = lambda key, fmt: '/'.join(format(row.get(key, math.nan), fmt) for row in rows)
        quality = (f'high-confidence modes {join("modes_captured", ".0f")}' if self.cfg['dataset'] == STACKED else
                   f'score {join("score", ".2f")}' if self.cfg['dataset'] not in MIXTURES else
                   f'captured {join("modes_captured", ".0f")} | high quality {join("high_quality", ".2f")}')
        dataset = self.cfg['dataset']
        n_modes = 1000 if dataset == STACKED else len(mixture(dataset)[0]) if dataset in MIXTURES else 10
        procs.say(f'eval {it:>5} | modes {join("modes", ".0f")} of {n_modes} | {quality} | KL {join("kl", ".3f")} | '
                  f'FD {join("fd", ".3g")} | D-pool mean {join("pool_mean", ".2f")} worst {join("pool_worst", ".2f")} '
                  f'| D(x) train {join("d_train", ".2f")} held-out {join("d_heldout", ".2f")}')

    def save(self, it, unlogged):
        """The sample grid of iteration it, then the checkpoint; never of non-finite weights."""
        if not procs.leader:
            return
        bad = [name for name, side in self.pairs.items()
               if not all(p.isfinite().all() for p in side.model.parameters())]
        if bad:
            self.stop(f'a weight of {" and ".join(bad)} became non-finite by iteration {it}')
        attempt('draw the sample grid', lambda: self.samples(it), self.said, 'draw_samples')
        self.grids += it % self.cfg['sample_every'] == 0  # one off schedule (Ctrl-C, the end): the next replaces it
        save_checkpoint(checkpoint_path(self.cfg), self.state_dict(unlogged))

    def samples(self, it):
        G, D = self.pairs['G'], self.pairs['D']
        order = [G.origin.index(g) for g in range(len(G.origin))]  # the slot of G1, G2, ...
        z = to_slots(self.fixed_z, G)
        samples = generate(self.pairs, z, self.fixed_y)
        if self.conditional is None and self.real is None:  # a conditional GAN's grids say which class each row is
            self.conditional = not torch.equal(samples, generate(self.pairs, z, (self.fixed_y + 1) % self.classes))
        rows = self.fixed_y[0, ::4].tolist() if self.conditional else None
        save_samples(self.path(f'{self.grids:0{self.digits}d}.png'), samples[order], it,
                     [D.origin[slot] for slot in order], self.real, rows)

    def losses(self):
        if procs.leader:
            save_losses(self.path('losses.png'), self.history, self.swaps, self.moved)

    def stop(self, message):
        self.losses()
        sys.exit(f'{SCRIPT_NAME}: {message}; stopped. The last good checkpoint ({checkpoint_path(self.cfg)}) is '
                 f'untouched.')


def statistics_of_pairs(stats, n):
    """A step's statistics as one (n, statistics) tensor: each one value per pair (n,), or one value for all, shown
    for each pair; any other shape is refused in one line."""
    device = next((v.device for v in stats.values() if torch.is_tensor(v)), None)
    columns = []
    for name, value in stats.items():
        try:
            value = torch.as_tensor(value, device=device).detach()
        except (TypeError, ValueError, RuntimeError):
            sys.exit(f'{SCRIPT_NAME}: the statistic {name!r} that train_step returns is {type(value).__name__}, not a '
                     f'number or tensor; a statistic is one value per pair, ({n},), or one value for all pairs, ()')
        if value.shape not in ((), (n,)):
            sys.exit(f'{SCRIPT_NAME}: the statistic {name!r} that train_step returns has shape {tuple(value.shape)}; '
                     f'a statistic is one value per pair, ({n},), or one value for all pairs, ()')
        columns.append(value.expand(n))
    return torch.stack(columns, 1)


RUN_FILES = ('checkpoint.pt', 'NNN.png', 'losses.png', 'metrics.csv', 'metrics.png')  # all a run writes in out_dir
# but .lock, which blocks nothing once its run is over (out_dir may also hold the caches of data_root and
# classifier_dir: never the run's)


@contextmanager
def claim_out_dir(cfg):
    """Make out_dir and hold the kernel's lock (flock) on its .lock while the run lives, refusing it to another live
    run (the lock dies with its process, even by kill -9); a fresh run also refuses another run's out_dir."""
    out = cfg['out_dir']
    try:
        os.makedirs(out, exist_ok=True)
        lock = open(os.path.join(out, '.lock'), 'a+')
    except OSError as error:
        raise WriteFailed(f'cannot use --out_dir={out} ({error.strerror or error})') from error
    with lock:  # closing it releases the lock at once, also where train() was called from Python and goes on
        try:
            if fcntl:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            refuse(f'--out_dir={out} is in use by another run (process {lock.read().strip() or "unknown"}); '
                   f'let it finish, stop it, or choose another --out_dir')
        lock.truncate(0)
        lock.write(f'{os.getpid()}\n')
        lock.flush()
        checkpoint = checkpoint_path(cfg)
        if not cfg['resume'] and os.path.exists(checkpoint):
            try:
                where = f'stopped after iteration {torch.load(checkpoint, "cpu", weights_only=True)["iteration"]}'
            except Exception:
                where = 'left an unreadable checkpoint.pt'
            refuse(f'--out_dir={out} holds another run, which {where}: continue it with --resume=True, start afresh '
                   f'with another --out_dir, or remove that run\'s own files from it ({", ".join(RUN_FILES)})')
        yield lock


@contextmanager
def interrupts_caught():
    """Ctrl-C (or torchrun's SIGTERM) ends the run after this iteration's checkpoint, a second one at once; yields
    their list. After a failed collective, torchrun's SIGTERM is ignored: the report of the loss must get out."""
    interrupted, lost_the_others = [], False

    def on_interrupt(signum, frame):
        interrupted.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGINT, on_interrupt)
    signal.signal(signal.SIGTERM, on_interrupt)
    try:
        yield interrupted
    except RuntimeError:
        lost_the_others = procs.world > 1
        raise
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_IGN if lost_the_others else signal.SIG_DFL)


def train(cfg):
    """Train the run cfg describes (under torchrun, this process's pairs); 0 when done, 130 when interrupted."""
    dev = procs.start(cfg)
    try:
        with claim_out_dir(cfg) if procs.leader else nullcontext(), denormals_flushed(dev):  # held until the end
            status = run(cfg, dev)
        procs.close(finished=True)
    except WriteFailed as failure:
        sys.exit(f'{SCRIPT_NAME}: {failure}; stopped. {what_is_left(cfg)}')
    except RuntimeError as error:  # a collective failed: another process died or hung
        if procs.world == 1:
            raise
        print(f'{SCRIPT_NAME}: process {procs.rank} lost the other processes ({str(error).splitlines()[0]}); '
              f'stopped. {what_is_left(cfg)}', file=sys.stderr, flush=True)
        procs.close(finished=False)  # said first: tearing down after a loss can take a while
        sys.exit(1)
    return status


@contextmanager
def denormals_flushed(dev):
    """On the CPU, denormal floats (below 1.2e-38 in float32) read and written as 0 while the run trains: x86 CPUs
    take many times longer over them, and on MNIST Adam's moments of the always-empty border pixels and the
    gradients through saturated sigmoids sink into that range, which slowed a run by a third after its first
    1,000 iterations. TensorFlow does the same on the CPU by default; torch does not. Runs stay deterministic.
    torch's worker threads take the setting from the thread that starts them, so train() sets it before the run's
    first computation: a command-line run flushes in every thread. train() called from Python after torch has
    already computed in parallel flushes in this thread only (torch cannot reach the running workers)."""
    flushing = dev.type == 'cpu' and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if flushing:  # train() called from Python: leave the caller's arithmetic as it was
            torch.set_flush_denormal(False)


def what_is_left(cfg):
    path = checkpoint_path(cfg)
    return (f'The last checkpoint, {path}, is intact.' if os.path.exists(path)
            else f'No checkpoint had been written to {cfg["out_dir"]} yet.')


def run(cfg, dev):
    """Set a run up (afresh or from its checkpoint) and train it; 0 when done, 130 when interrupted (and saved)."""
    if cfg['threads']:
        torch.set_num_threads(cfg['threads'])
    state = load_checkpoint(checkpoint_path(cfg), cfg, dev) if cfg['resume'] else None
    if state and state['iteration'] + 1 >= cfg['iterations']:
        procs.say(f'nothing to train: the run in {cfg["out_dir"]} stopped after iteration {state["iteration"]}, and '
                  f'it already reached --iterations={cfg["iterations"]}; raise it to go on')
        return 0
    where = f' from {cfg["data_root"]}' if cfg['dataset'] not in MIXTURES else ''
    procs.say(f'loading the {cfg["dataset"]} training set{where}')
    images, labels = training_data(cfg)
    with interrupts_caught() as interrupted:  # from here on a Ctrl-C ends in a checkpoint
        recorder = Recorder(cfg, dev, images, labels, state, interrupted)
        world, threads = procs.world, torch.get_num_threads()
        procs.say(f'GAP: {cfg["n_pairs"]} pairs, K={cfg.get("K")}, {cfg["train_size"] or len(images)} {cfg["dataset"]} '
                  f'training points, device {dev}, {cfg["dtype"]}, {world} process{"es" * (world > 1)} x {threads} '
                  f'thread{"s" * (threads > 1)}, iterations {recorder.iteration + 1}..{cfg["iterations"] - 1}')
        if cfg['eval_every'] and not recorder.evaluator:
            procs.say(f'no evaluation: the run ends before eval_every={cfg["eval_every"]}; for metrics of a short run, '
                      f'add --eval_at_end=True (or a smaller --eval_every)')
        stopped = train_loop(cfg, recorder.share, recorder.data, recorder.noise_rng, recorder)
    return 130 if stopped else 0


def main(argv):
    """The command line's run (or comparison); its exit status. cfg is no global: the code reads it where passed."""
    cfg = parse_args(argv)
    return compare_runs(cfg) if cfg['compare'] else train(cfg)


if __name__ == '__main__':
    status = main(sys.argv[1:])
    if int(os.environ.get('WORLD_SIZE', 1)) > 1:  # under torchrun, a finished process skips the interpreter's
        sys.stdout.flush()  # teardown, where a gloo thread still running as C++ statics are destroyed can abort it
        sys.stderr.flush()  # (std::terminate, exit status -6) after the run and its files are complete
        os._exit(status)
    sys.exit(status)
