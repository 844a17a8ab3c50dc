"""
Generative Adversarial Parallelization (GAP; Im, Ma, Kim & Taylor, arXiv:1612.04021), after wiseodd's
gap_pytorch.py: several GANs train side by side, and every K iterations their discriminators change partners.
K=0 never swaps: independent GANs, the baseline. `python parallel_gan.py --help` lists the hyperparameters;
`--paper=True` sets the paper's conditions, `--compare=DIR` judges runs by one pool of discriminators, and
`torchrun --nproc_per_node=2 parallel_gan.py` trains one pair per process. Writes out/NNN.png, out/losses.png,
out/metrics.csv, out/metrics.png and out/checkpoint.pt (--resume=True). Top to bottom: the hyperparameters,
networks, losses, step, swap, one iteration and the training loop; below one divider, the support.
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
# GAP
n_pairs = 2  # generator/discriminator pairs trained side by side
K = 100  # the discriminators change partners every K iterations (0: never, independent GANs)
# training
mb_size = 32  # minibatch size
lr = 1e-3  # Adam learning rate of every network
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
# output
log_every = 1000  # print a log line (means since the previous one) every this many iterations
sample_every = 1000  # write out/NNN.png and the checkpoint every this many iterations
out_dir = 'out'  # where samples, plots and the checkpoint go
resume = False  # continue from out_dir/checkpoint.pt exactly where it stopped
resume_edited = False  # resume also when the algorithm's code differs from the run's
# data
dataset = 'mnist'  # 'mnist', 'fashion_mnist', or the 2-D Gaussian mixtures 'ring8', 'grid25' and 'r15'
data_root = 'out/data'  # MNIST lives in data_root/MNIST/raw, Fashion-MNIST in data_root/FashionMNIST/raw
train_size = 0  # train on only the first this many training examples (0: all of them)
# evaluation: mode coverage and sample quality, GAP against no-swap
eval_every = 10_000  # evaluate every this many iterations, and at the end of a run that reached one (0: never)
eval_at_end = False  # evaluate at the end also a run shorter than eval_every
eval_samples = 10_000  # samples per generator in each evaluation
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
# the networks. All pairs' networks of one side are one module whose every weight has a leading pairs
# dimension, so every pair runs in the same batched product; activations are (n_pairs, batch, features).
# Edit generator() and discriminator() as you would an nn.Sequential; PerPair (support part) makes any torch
# module per pair.

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
    """n discriminators, a sample (x_dim) -> the logit of P(real)."""
    h, layers = cfg['h_dim'], []
    for fan_in in [x_dim] + [h] * (cfg['layers'] - 1):
        layers.append(Linear(n, fan_in, h))
        if cfg['batch_norm']:
            layers.append(BatchNorm(n, h))
        layers.append(nn.ReLU(inplace=True))
    return Networks(*layers, Linear(n, h, 1))


class Side:
    """All generators or all discriminators: the networks, their optimiser (one per network, where its update is
    elementwise, as torch.optim's are), and origin[i], the pair whose network slot i holds now."""

    def __init__(self, model, optimizer, n_pairs):
        self.model, self.optimizer, self.origin = model, optimizer, list(range(n_pairs))

    def per_network(self):
        """Every tensor with one slice per network: weights, buffers, optimiser state (not its scalar step)."""
        state = [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()]
        return [*self.model.parameters(), *self.model.buffers(), *state]

    def state_dict(self):
        return {'model': self.model.state_dict(), 'optimizer': self.optimizer.state_dict(), 'origin': self.origin}

    def load_state_dict(self, state):
        settings = [{k: v for k, v in group.items() if k != 'params'} for group in self.optimizer.param_groups]
        self.model.load_state_dict(state['model'])
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
    """One step of every pair. z, x: (1, batch, dim) shared by every pair or (n_pairs, batch, dim); y: the labels
    (unused: a conditional GAN's edit reads them). Pair i's losses reach only pair i's networks, so one backward
    of their sum trains every pair. Returns each pair's statistics, {name: (n_pairs,)}."""
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


def swap_discriminators(D, partners):
    """GAP's swap: generator i now trains against the discriminator that was at partners[i]."""
    swap_networks(D, partners)


@torch.no_grad()
def swap_networks(side, partners):
    """Slot i takes the network that was in slot partners[i]: weights, buffers, optimiser state and origin."""
    for t in side.per_network():
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
    if len(z) == 1 or G.origin == list(range(len(z))):
        return z
    return z[G.origin]


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
    x, y = data.next()
    input_noise = input_noise_of(cfg, it, x.shape[-1], noise_rng, dtype)
    # own_share: under torchrun, this process's pairs' part of what every pair drew (support part)
    z, x, y, *input_noise = (own_share(t) for t in (z, x, y, *input_noise))
    stats = train_step(G, D, z, x, y, input_noise, cfg['clip'])
    if swaps_at(it, cfg):
        swap_discriminators(D, new_partners(cfg, it))
    return stats


def train_loop(cfg, pairs, data, noise_rng, recorder):
    """Train from the recorder's next iteration to the last. recorder (support part: Recorder) logs, evaluates,
    saves on schedule and catches Ctrl-C; True when it stopped the run early (after a checkpoint)."""
    for it in range(recorder.iteration + 1, cfg['iterations']):
        stats = gap_iteration(it, pairs, data, noise_rng, cfg)
        if recorder.after(it, stats):
            return True
    return False


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


CLASSIFIER_VERSION = 1  # bump when Classifier or its training changes, so caches are rebuilt
CLASSIFIER_EPOCHS = {'mnist': 3, 'fashion_mnist': 6}
COLLECTIVE_TIMEOUT = 300  # seconds a process waits for the others before it gives up
COUNTS = ('z_dim', 'h_dim', 'layers', 'n_pairs', 'K', 'mb_size', 'iterations', 'seed', 'log_every', 'sample_every',
          'train_size', 'eval_every', 'eval_samples', 'threads')  # whole numbers (2e5 written in the block is one)
# a resume may change these: the run continues exactly, only its schedule, its files or its lr change
RESUMABLE = ('lr', 'iterations', 'log_every', 'sample_every', 'out_dir', 'resume', 'resume_edited', 'data_root',
             'eval_every', 'eval_at_end', 'eval_samples', 'classifier_dir', 'compare', 'device', 'threads')
NOT_CONFIGURATION = (*RESUMABLE, 'seed')  # runs that differ only in these are seeds of one configuration
POOL_KEYS = ('z_dim', 'h_dim', 'layers', 'dataset')  # runs that differ in these cannot share one pool in --compare
IMAGE_DATASETS = {'mnist': 'MNIST', 'fashion_mnist': 'FashionMNIST'}  # torchvision's class and folder names
R15_CENTRE = (10.0, 9.96)  # where R15's own coordinates put the centre of the mixture that mixture('r15') centres
MNIST_FILES = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')
ACCEPTED = {bool: 'True or False', int: 'a whole number', float: 'a number', str: 'a string',
            None: 'a number, True/False or a string'}
KINDS_OF = {int: COUNTS, float: ('lr', 'beta1', 'input_noise', 'clip'),  # what the block's names take, as shipped
            bool: ('paper', 'own_noise', 'batch_norm', 'resume', 'resume_edited', 'eval_at_end'),
            str: ('prior', 'swap', 'out_dir', 'dataset', 'data_root', 'classifier_dir', 'compare', 'device', 'dtype')}

# ------------------------------------------------------------------------------------
# command line: --name=value, checked against the kind of value each name takes

def read_block():
    """(name, default, meaning) of each line `name = value  # meaning` of the hyperparameter block, read from this
    file so that --help never drifts; a line of another form, or a value of the wrong kind, is refused."""
    with open(__file__) as f:
        lines = f.read().splitlines()
    first, table = next(i for i, line in enumerate(lines) if line.startswith('# --- hyperparameters')) + 1, []
    for number, line in enumerate(lines[first:], first + 1):
        if line.startswith('# --- end of hyperparameters'):
            return table
        found = re.fullmatch(r'(\w+) = [^#]+?(?:\s*#\s*(.*))?', line)
        where = f'{os.path.basename(__file__)} line {number}'
        if line.strip() and not line.startswith('#') and (not found or found[1] not in globals()):
            refuse(f'{where}: {line.strip()!r} is not a hyperparameter; write one `name = value  # meaning` per line')
        if found:
            name, value = found[1], globals()[found[1]]
            if of_kind(kind_of(name, value), value) is None:
                refuse(f'{where}: {name} must be {ACCEPTED[kind_of(name, value)]}, not {value!r}')
            table.append((name, of_kind(kind_of(name, value), value), found[2] or ''))


def kind_of(name, default):
    """The kind of value a hyperparameter takes: the one KINDS_OF gives it (whatever the block holds), else, for a
    name added to the block, a number for a number, else its default's kind (None: no kind the block takes)."""
    kind = next((kind for kind, names in KINDS_OF.items() if name in names), type(default))
    return float if kind is int and name not in COUNTS else kind if kind in ACCEPTED else None


def of_kind(kind, value):
    """value as a value of kind: a whole float (2e5) as a count, an integer as a float; None for another kind."""
    if kind is int and type(value) is float and value.is_integer() or kind is float and type(value) is int:
        return kind(value)
    return value if type(value) is kind else None


def refuse(message):
    """Bad input: one line on stderr and exit status 2, before any work starts."""
    print(f'parallel_gan.py: error: {message}', file=sys.stderr)
    sys.exit(2)


def convert(name, text, default):
    """The text of --name=text as a value of name's kind, or a refusal saying what is accepted. Numbers take the
    forms the block takes: 1000, 1_000, 1e3 (a count too, when it is whole)."""
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
    """Refuse values that make no sense, before any work starts."""
    at_least = {'z_dim': 1, 'h_dim': 1, 'layers': 1, 'n_pairs': 1, 'mb_size': 1, 'iterations': 1, 'log_every': 1,
                'sample_every': 1, 'eval_samples': 2, 'K': 0, 'train_size': 0, 'eval_every': 0, 'threads': 0,
                'input_noise': 0, 'clip': 0}  # 0: off (never, all, torch's default, none)
    one_of = {'dataset': (*IMAGE_DATASETS, *MIXTURES), 'dtype': ('float32', 'float64'),
              'prior': ('gaussian', 'uniform', 'mixed'), 'swap': ('derangement', 'matching')}
    rules = [(cfg[k] >= low and math.isfinite(cfg[k]), f'{k} must be at least {low}' + ' (0: off)' * (low == 0))
             for k, low in at_least.items()] + [(cfg[k] in values, f'{k} must be one of {", ".join(values)}')
                                                for k, values in one_of.items()] + [
        (cfg['K'] == 0 or cfg['n_pairs'] >= 2, 'K>0 swaps discriminators between pairs: it needs n_pairs >= 2 (or K=0)'),
        (cfg['mb_size'] >= 2 or not cfg['batch_norm'], 'batch_norm needs mb_size of at least 2'),
        (cfg['lr'] > 0 and math.isfinite(cfg['lr']), 'lr must be a positive number'),
        (0 <= cfg['beta1'] < 1, 'beta1 must be at least 0 and below 1'),
        (0 <= cfg['seed'] < 2 ** 32, 'seed must be a whole number from 0 to 2**32 - 1 (4294967295)'),
        (re.fullmatch(r'auto|cpu|cuda(:\d+)?', cfg['device']) is not None, "device must be 'auto', 'cpu' or 'cuda[:N]'"),
        (not cfg['device'].startswith('cuda') or torch.cuda.is_available(),
         f"device {cfg['device']!r} asked for, but CUDA is not available here (use --device=cpu or auto)")]
    for ok, message in rules:
        if not ok:
            refuse(message)


block_values = {}  # the block as the last parse_args read it: checkpoints keep it, so that a resume can tell its edits
explicit = set()  # the names given explicitly: on the command line, and, on a resume, those edited in the block


def parse_args(argv):
    """The hyperparameters: the block's, overridden by --name=value arguments; on a resume, the checkpoint's,
    overridden only by those given explicitly (continued). Sets block_values and explicit."""
    global block_values, explicit
    table = read_block()
    cfg = {name: default for name, default, _ in table}
    block_values, explicit = dict(cfg), set()
    for arg in argv:
        if arg in ('-h', '--help'):
            show_help(table)
        name, eq, text = arg[2:].partition('=')
        if not (arg.startswith('--') and eq and name in cfg):
            refuse(f'unknown argument {arg!r}: use --name=value with a name from: {", ".join(cfg)}')
        cfg[name] = convert(name, text, cfg[name])
        explicit.add(name)
    if cfg['paper']:  # the paper's conditions, where the command line does not say otherwise
        cfg.update({name: value for name, value in PAPER.items() if name not in explicit})
    if cfg['resume'] and not cfg['compare']:
        cfg, explicit = continued(cfg, explicit)
    check(cfg)
    return cfg


def show_help(table):
    lines = [__doc__.strip(), '', 'hyperparameters (--name=value):']
    with suppress(BrokenPipeError):  # `--help | head`: the reader stopped early, which is no error
        print('\n'.join(lines + [f'  --{name:<15} {default!r:<18} {meaning}' for name, default, meaning in table]))
        sys.stdout.flush()
    sys.exit(0)


def continued(cfg, named):
    """A resume's hyperparameters and the names given explicitly: the checkpoint's values, but for the names on the
    command line and those edited in the block since the checkpoint's run. A missing or damaged checkpoint is left
    to load_checkpoint to refuse."""
    try:
        state = torch.load(checkpoint_path(cfg), map_location='cpu', weights_only=True)
        saved, then = state['hyperparameters'], state['block']
    except Exception:
        return cfg, named
    given = named | {name for name, value in then.items() if name in block_values and value != block_values[name]}
    return {k: cfg[k] if k in given or k in ('out_dir', 'resume') or k not in saved else saved[k] for k in cfg}, given


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
        images, labels = data.data, data.targets
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        for folder_made in made:  # leave no empty folders behind, which would look like a half-done download
            if os.path.isdir(folder_made) and not os.listdir(folder_made):
                os.rmdir(folder_made)
        sys.exit(f'parallel_gan.py: could not load {folder} from {raw}/ ({reason}).\n'
                 f'To run offline, put the four uncompressed files {", ".join(MNIST_FILES)}\n'
                 f'in {raw}/ (torchvision\'s raw layout), or point --data_root at a folder that has them.')
    return images.reshape(len(images), -1), labels


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


def data_dim(dataset):
    """The size of one example: 784 pixels, or a 2-D point."""
    return 2 if dataset in MIXTURES else 784


def training_data(cfg):
    """The whole training set and its labels: image pixels as uint8 (N, 784), or 60,000 points of a 2-D mixture."""
    if cfg['dataset'] in MIXTURES:
        return sample_mixture(cfg['dataset'], 60_000, seed=12345)  # one fixed training set for every seed
    return load_images(cfg['dataset'], cfg['data_root'])


def used_for_training(data, cfg):
    """The part of the training set the networks see: the first train_size examples (0: all)."""
    if cfg['train_size'] > len(data):
        refuse(f'train_size={cfg["train_size"]} but the {cfg["dataset"]} training set has only {len(data)} examples')
    return data[:cfg['train_size'] or len(data)]


class Batches:
    """Minibatches of a data set on the training device, as D's inputs (dtype) with their labels, a fresh shuffle
    each epoch: (1, batch, x_dim) and (1, batch), shared by every pair. Every example is used once per epoch (a
    batch that runs past an epoch's end takes the rest from the next shuffle, as the reference's reader did)."""

    def __init__(self, data, labels, mb_size, seed, dtype):
        self.data, self.labels, self.mb_size, self.dtype = data, labels, mb_size, dtype
        self.rng = torch.Generator(device=data.device).manual_seed(seed)
        self.order, self.pos = self.shuffle(), 0

    def shuffle(self):
        return torch.randperm(len(self.data), generator=self.rng, device=self.data.device)

    def rows(self):
        parts, need = [], self.mb_size
        while need:
            if self.pos == len(self.order):
                self.order, self.pos = self.shuffle(), 0
            take = min(need, len(self.order) - self.pos)
            parts.append(self.order[self.pos:self.pos + take])
            self.pos, need = self.pos + take, need - take
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def next(self):
        rows = self.rows()  # index_select: a plain row gather, several times faster than data[rows]
        return as_inputs(self.data.index_select(0, rows), self.dtype)[None], self.labels.index_select(0, rows)[None]

    def state_dict(self):
        return {'rng': self.rng.get_state(), 'order': self.order.cpu(), 'pos': self.pos}

    def load_state_dict(self, state):
        self.rng.set_state(state['rng'])
        self.order, self.pos = state['order'].to(self.data.device), state['pos']


class PairBatches:
    """Each pair's own minibatches (own_noise): one Batches per pair, each its own shuffle; (n_pairs, batch, ...)."""

    def __init__(self, data, labels, mb_size, seeds, dtype):
        self.data, self.each = data, [Batches(data, labels, mb_size, seed, dtype) for seed in seeds]

    def next(self):
        x, y = zip(*(batches.next() for batches in self.each))
        return torch.cat(x), torch.cat(y)

    def state_dict(self):
        return {'each': [batches.state_dict() for batches in self.each]}

    def load_state_dict(self, state):
        for batches, saved in zip(self.each, state['each']):
            batches.load_state_dict(saved)


def make_batches(data, labels, cfg, seed, dtype):
    """One shuffle shared by every pair, or each pair its own (own_noise)."""
    if not cfg['own_noise']:
        return Batches(data, labels, cfg['mb_size'], seed, dtype)
    return PairBatches(data, labels, cfg['mb_size'], [seed + 1_000_003 * (k + 1) for k in range(cfg['n_pairs'])], dtype)


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
            self.dist = dist
            dist.init_process_group('nccl' if self.device.type == 'cuda' else 'gloo',
                                    timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT))
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
        if self.world > 1 and self.dist.is_initialized():
            if finished:
                self.dist.barrier()  # nobody tears down while another still talks
            self.dist.destroy_process_group()


procs = Processes()


def pick_device(name):
    return torch.device('cuda' if name == 'auto' and torch.cuda.is_available() else 'cpu' if name == 'auto' else name)


def own_share(t):
    """This process's pairs' part of t, every pair's (n_pairs, ...); t shared by every pair, (1, ...), as it is."""
    return t if procs.world == 1 or t is None or len(t) == 1 else t[procs.slots.to(t.device)]


def exchange(t, partners):
    """t (this process's slots of a per-network tensor) after slot i takes what slot partners[i] held."""
    mine = partners if procs.world == 1 else partners[procs.slots]
    return procs.gather(t)[mine.to(t.device)]


def per_network(state, f):
    """A side's state_dict with f applied to every per-network tensor (one with a leading pairs dimension)."""
    if torch.is_tensor(state):
        return f(state) if state.dim() else state
    if isinstance(state, dict):
        return {k: per_network(v, f) for k, v in state.items()}
    return type(state)(per_network(v, f) for v in state) if isinstance(state, (list, tuple)) else state


def share_of_process(pairs, cfg, x_dim):
    """The pairs this process trains: all of them in one process; under torchrun copies of its slots' slices."""
    if procs.world == 1:
        return pairs
    share = make_pairs(cfg, x_dim, procs.device, getattr(torch, cfg['dtype']), n=len(procs.slots))
    for name, side in share.items():
        side.load_state_dict(per_network(pairs[name].state_dict(), lambda t: t[procs.slots.to(t.device)]))
    return share


def collect_pairs(pairs, share):
    """Bring pairs (every pair) up to date from every process's share (every process must call it)."""
    if share is not pairs:
        for name, side in pairs.items():
            side.load_state_dict(per_network(share[name].state_dict(), procs.gather))


# ------------------------------------------------------------------------------------
# files: each written whole or not at all; checkpoints loaded with weights_only=True

class WriteFailed(Exception):
    """A file could not be written (out_dir unwritable, disk full, ...): the run stops with this one line."""


@contextmanager
def replacing(path):
    """Yield a temporary path to write path's new content to, then rename it over path: a crash or a failed
    write never leaves path half-written, and a failure leaves no temporary file and raises WriteFailed."""
    tmp = path + '.tmp'
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as error:
        with suppress(OSError):
            os.remove(tmp)
        raise WriteFailed(f'cannot write {path} ({error.strerror or error})') from error


def write_csv(path, header, rows):
    """A CSV file of rows (dicts, or lists in header's order), written whole: floats as 6 digits, lists as numbers."""
    cell = lambda v: ' '.join(f'{x:.4g}' for x in v) if isinstance(v, list) else f'{v:.6g}' if isinstance(v, float) else v
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
    """{name: crc32} of each definition in the algorithm part (from the hyperparameter block to the divider), as
    Python's parser reads it: comments, docstrings and layout change nothing. Checkpoints keep it, so that a resume
    and --compare can tell a run trained by other code."""
    with open(__file__) as f:
        source = f.read()
    code = {}
    for node in ast.parse(source[source.index('# --- end of hyperparameters'):source.index('\n# ====')]).body:
        for inner in ast.walk(node):
            if isinstance(inner, (ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(inner) is not None:
                inner.body = inner.body[1:] or [ast.Pass()]
        code[node.name if hasattr(node, 'name') else ast.unparse(getattr(node, 'targets', [node])[0])] = zlib.crc32(
            ast.dump(node).encode())
    return code


def code_differences(then, now):
    """'d_loss changed; hinge added' between two algorithm_code()s; '' where they agree or then is unknown."""
    words = [(sorted(k for k in now if k in then and now[k] != then[k]), 'changed'),
             (sorted(k for k in now if k not in then), 'added'), (sorted(k for k in then if k not in now), 'removed')]
    return '; '.join(f'{", ".join(names)} {word}' for names, word in words if names) if then is not None else ''


def load_checkpoint(path, cfg, dev):
    """The checkpoint's state, or a refusal in one line: missing, damaged, written on another device, or asked to go
    on with settings that would not continue it exactly (all but RESUMABLE) or by other code (unless
    resume_edited)."""
    if not os.path.exists(path):
        refuse(f'--resume=True but there is no checkpoint at {path}')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
        saved = {name: default for name, default, _ in read_block()} | state['hyperparameters']
        state['iteration'], state['pairs'], state['code']  # everything a resume needs is there
    except Exception as error:
        refuse(f'cannot resume: {path} is damaged or not a checkpoint of this script ({type(error).__name__})')
    changed = '; '.join(f'{k}={saved[k]!r} there, {cfg[k]!r} now' for k in cfg if k not in RESUMABLE and saved[k] != cfg[k])
    edits, there = code_differences(state['code'], algorithm_code()), state.get('device', 'cpu')
    for refused, message in [
            (changed, f'cannot resume from {path} with other settings, which would not continue it exactly ({changed}); '
                      f'a resume may change only {", ".join(RESUMABLE)}'),
            (there != dev.type, f'cannot resume from {path} on the {dev.type}: it was written on the {there}, and its '
                                f'noise and data order continue exactly only there (--device={there})'),
            (edits and not cfg['resume_edited'], f'cannot resume from {path}: the algorithm\'s code differs from the one '
                                                 f'that trained it ({edits}); --resume_edited=True continues it as it is now')]:
        if refused:
            refuse(message)
    return state


def load_pairs(pairs, saved, where):
    """Load every side from a checkpoint's, or refuse in one line where the script builds other networks."""
    for name, side in pairs.items():
        try:
            side.load_state_dict(saved[name])
        except (KeyError, RuntimeError, ValueError) as error:
            reason = str(error).strip().splitlines()[-1 if isinstance(error, RuntimeError) else 0].strip()
            refuse(f'{where} holds other networks than this script builds ({name}: {reason})')


# evaluation: does each generator cover the data's modes, how good are its samples, does each D generalise?

class Classifier(nn.Module):
    """A small convolutional digit classifier; its 128-unit penultimate layer gives the Frechet distance's features."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 7 * 7, 128),
            nn.ReLU())
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        """(class logits, features) for (batch, 784) pixels in [0, 1]."""
        features = self.features(x)
        return self.head(features), features


def fit_classifier(images, labels, epochs, dev, batch_size=128, seed=0):
    """Train a Classifier on uint8 (N, 784) images with Adam."""
    torch.manual_seed(seed)
    model = Classifier().to(dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, labels = images.to(dev), labels.to(dev).long()
    for _ in range(epochs):
        for batch in torch.randperm(len(images), device=dev).split(batch_size):
            loss = F.cross_entropy(model(images[batch].float() / 255)[0], labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def classify(model, pixels, chunk=500):
    """Class probabilities and features of (N, 784) pixels in [0, 1]."""
    outputs = [model(part.float()) for part in pixels.split(chunk)]
    return torch.cat([o[0] for o in outputs]).softmax(1), torch.cat([o[1] for o in outputs])


def load_classifier(cfg, dev, images, labels):
    """The classifier of cfg's image dataset: cached when trained on the same data, else trained now (and cached
    where it can be). Prints its test accuracy; returns it and the test set's feature statistics."""
    test_images, test_labels = load_images(cfg['dataset'], cfg['data_root'], train=False)
    fingerprint = [CLASSIFIER_VERSION, *(zlib.crc32(t.contiguous().numpy()) for t in (images, labels, test_images))]
    path, model = os.path.join(cfg['classifier_dir'], f'{cfg["dataset"]}.pt'), Classifier().to(dev)
    try:
        cached = torch.load(path, map_location=dev, weights_only=True)
        if cached['fingerprint'] != fingerprint:
            raise ValueError('trained on other data')
        model.load_state_dict(cached['model'])
        model.eval()
        how = f'cached in {path}'
    except Exception:
        print(f'training the classifier that scores samples ({CLASSIFIER_EPOCHS[cfg["dataset"]]} epochs on '
              f'{len(images)} images: about a minute on 2 CPU cores; once, then cached in {path})', flush=True)
        start = time.perf_counter()
        model = fit_classifier(images, labels, CLASSIFIER_EPOCHS[cfg['dataset']], dev)
        how = f'trained in {time.perf_counter() - start:.0f}s'
        try:
            os.makedirs(cfg['classifier_dir'], exist_ok=True)
            save_checkpoint(path, {'fingerprint': fingerprint, 'model': model.state_dict()})
            how += f', cached in {path}'
        except (OSError, WriteFailed) as error:
            how += f', not cached ({error.strerror if isinstance(error, OSError) else error})'
    probs, features = classify(model, test_images.to(dev) / 255)
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
    return {'modes': covered, 'modes_captured': math.nan, 'kl': kl, 'score': score,
            'confidence': probs.max(1).values.mean().item(), 'fd': frechet_distance(feature_stats(features), test_stats),
            'high_quality': math.nan, 'histogram': (counts.double() / len(probs)).tolist()}


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
def generate(G, z):
    """Each generator's samples of the noise z, (n_pairs, batch, x_dim), in eval mode."""
    with evaluating(G):
        return G.model(z)


@torch.no_grad()
def cross_scores(D, samples):
    """The paper's cross-scoring: scores[d, g] = mean D_d(G_g(z)), d by slot, g by samples' order."""
    with evaluating(D):
        return torch.stack([torch.sigmoid(D.model(s)).mean((1, 2)) for s in samples], 1).double().cpu()


@torch.no_grad()
def judge_real(D, points, chunk=1000):
    """Each discriminator's mean D(x) and accuracy (D > 0.5) on real points (N, x_dim), in slot order."""
    with evaluating(D):
        prob = torch.cat([torch.sigmoid(D.model(part)) for part in points.split(chunk)], 1)
    return prob.mean((1, 2)).double().cpu(), (prob > 0.5).double().mean((1, 2)).cpu()


def held_out_data(cfg, n):
    """n examples the networks never train on: the test split's first n images, or fresh draws of the mixture."""
    if cfg['dataset'] in MIXTURES:
        return sample_mixture(cfg['dataset'], n, seed=777)[0]
    return load_images(cfg['dataset'], cfg['data_root'], train=False)[0][:n]


METRIC_COLUMNS = ('iteration', 'generator', 'modes', 'modes_captured', 'kl', 'score', 'confidence', 'fd',
                  'high_quality', 'pool_mean', 'pool_worst', 'd_train', 'd_heldout', 'd_gap', 'd_train_acc',
                  'd_heldout_acc', 'd_acc_gap', 'histogram', 'd_scores')


class Evaluator:
    """Scores every generator on eval_samples samples (coverage, quality, the pool of discriminators' verdict) and
    every discriminator on real training and held-out examples. An edited network that cannot take what it is
    given leaves its columns nan, and one line says so (once)."""

    def __init__(self, cfg, dev, dtype, train_data, train_labels):
        self.cfg, self.dev, self.dtype, self.cannot = cfg, dev, dtype, set()
        if cfg['dataset'] in MIXTURES:
            self.classifier = None
            self.reference = feature_stats(sample_mixture(cfg['dataset'], cfg['eval_samples'], seed=54321)[0])
        else:  # the classifier learns from the whole training set, whatever train_size the GANs see
            self.classifier, self.reference = load_classifier(cfg, dev, train_data, train_labels)
        seen = used_for_training(train_data, cfg)
        heldout = held_out_data(cfg, min(cfg['eval_samples'], len(seen)))
        self.real = {'train': as_inputs(seen[:len(heldout)].to(dev), dtype), 'heldout': as_inputs(heldout.to(dev), dtype)}

    def generator_metrics(self, samples):
        """Coverage and quality of one generator's samples (N, x_dim)."""
        if self.classifier is None:
            return mixture_metrics(samples.cpu(), self.cfg['dataset'], self.reference)
        return image_metrics(*classify(self.classifier, as_unit_pixels(samples)), self.reference)

    def samples(self, G, it):
        """eval_samples samples of every generator, by the pair it started in: (n_pairs, eval_samples, x_dim)."""
        rng = torch.Generator(device=self.dev).manual_seed(self.cfg['seed'] * 1_000_003 + it + 7)  # not training's
        chunks = [generate(G, to_slots(draw_noise(self.cfg, len(n), rng, self.dtype), G))
                  for n in torch.arange(self.cfg['eval_samples']).split(1000)]
        return torch.cat(chunks, 1)[[G.origin.index(g) for g in range(len(G.origin))]]

    def pool(self, D, samples):
        """scores[d, g]: discriminator d's mean output on generator g's samples, both by the pair they started in."""
        scores = torch.empty(len(D.origin), len(samples), dtype=torch.float64)
        scores[D.origin] = sum(cross_scores(D, part) * part.shape[1] for part in samples.split(1000, 1)) / samples.shape[1]
        return scores

    def judged(self, D):
        """How each discriminator (by the pair it started in) judges real training and held-out examples."""
        judged = {}
        for split, points in self.real.items():
            for key, in_slots in zip((f'd_{split}', f'd_{split}_acc'), judge_real(D, points)):
                judged[key] = torch.empty_like(in_slots)
                judged[key][D.origin] = in_slots
        judged['d_gap'], judged['d_acc_gap'] = judged['d_train'] - judged['d_heldout'], judged['d_train_acc'] - judged[
            'd_heldout_acc']
        return judged

    def __call__(self, pairs, it):
        """One row per generator (by the pair it started in): its metrics, its mean and worst score over the pool,
        and how the discriminator that started in its pair judges real training and held-out examples."""
        G, D = pairs['G'], pairs['D']
        rows = [{'iteration': it, 'generator': g + 1, **dict.fromkeys(METRIC_COLUMNS[2:-2], math.nan)}
                for g in range(len(G.origin))]
        samples = attempt('measure the generators (their samples)', lambda: self.samples(G, it), self.cannot)
        if samples is not None:
            for row, mine in zip(rows, samples):
                row.update(attempt('measure coverage and quality', lambda: self.generator_metrics(mine), self.cannot) or {})
            scores = attempt('measure the pool of discriminators', lambda: self.pool(D, samples), self.cannot)
            for g, row in enumerate(rows if scores is not None else []):
                row.update(pool_mean=scores[:, g].mean().item(), pool_worst=scores[:, g].min().item(),
                           d_scores=scores[:, g].tolist())
        judged = attempt('measure the discriminators on real data', lambda: self.judged(D), self.cannot)
        for g, row in enumerate(rows if judged is not None else []):
            row.update({key: value[g].item() for key, value in judged.items()})
        return rows


def write_metrics(path, rows, keep_until):
    """metrics.csv: its rows up to iteration keep_until (a resumed run redoes later ones), then rows."""
    old = [row for row in read_csv(path) if int(row['iteration']) <= keep_until] if os.path.exists(path) else []
    write_csv(path, METRIC_COLUMNS, old + rows)


def format_eval(rows, n_modes):
    """One log line for an evaluation: per generator (G1/G2/...), then per discriminator (D1/D2/...)."""
    join = lambda key, fmt: '/'.join(format(row.get(key, math.nan), fmt) for row in rows)
    quality = (f'score {join("score", ".2f")}' if math.isfinite(rows[0].get('score', math.nan)) else
               f'captured {join("modes_captured", ".0f")} | high quality {join("high_quality", ".2f")}')
    return (f'eval {rows[0]["iteration"]:>5} | modes {join("modes", ".0f")} of {n_modes} | {quality} | '
            f'KL {join("kl", ".3f")} | FD {join("fd", ".3g")} | D-pool mean {join("pool_mean", ".2f")} worst '
            f'{join("pool_worst", ".2f")} | D(x) train {join("d_train", ".2f")} held-out {join("d_heldout", ".2f")}')


# ------------------------------------------------------------------------------------
# comparing runs: every generator judged by one pool of discriminators from every run (the paper's GAM-II)

def find_runs(folder):
    """(name, checkpoint) of every checkpoint.pt in or below folder, hyperparameters completed with today's defaults;
    a damaged one is skipped with a warning; refused when none is left or the runs cannot share a pool."""
    paths = sorted(glob.glob(os.path.join(folder, '**', 'checkpoint.pt'), recursive=True))
    if not paths:
        refuse(f'--compare={folder}: no checkpoint.pt in or below it' + ('' if os.path.isdir(folder) else ' (no such folder)'))
    defaults, runs, damaged = {name: default for name, default, _ in read_block()}, [], []
    for path in paths:
        try:
            state = torch.load(path, map_location='cpu', weights_only=True)
            state['hyperparameters'] = {**defaults, **state['hyperparameters']}
            runs.append((os.path.relpath(os.path.dirname(path), folder), state, state['pairs']['D']['model']))
        except Exception as error:
            damaged.append(f'{path} ({type(error).__name__})')
    if not runs:
        refuse(f'--compare={folder}: none of its {len(paths)} checkpoint(s) could be read: {", ".join(damaged)}')
    for path in damaged:
        print(f'parallel_gan.py: warning: skipping {path}: damaged or not a checkpoint of this script', file=sys.stderr)
    values = {key: sorted({repr(state['hyperparameters'][key]) for _, state, _ in runs}) for key in POOL_KEYS}
    differ = [f'{key} ({" vs ".join(v)})' for key, v in values.items() if len(v) > 1]
    if differ:
        refuse(f'--compare={folder}: these runs cannot share a pool of discriminators, they differ in {", ".join(differ)}')
    return [(name, state) for name, state, _ in runs]


def configurations(runs):
    """Each run's configuration: the hyperparameters that differ between the runs, seeds and output settings aside;
    runs trained by other code are other configurations, whatever their settings."""
    keys = [k for k in runs[0][1]['hyperparameters'] if k not in NOT_CONFIGURATION
            and len({repr(state['hyperparameters'][k]) for _, state in runs}) > 1]
    configs = [' '.join(f'{k}={state["hyperparameters"][k]}' for k in keys) for _, state in runs]
    codes = [state.get('code') for _, state in runs]
    versions = list(dict.fromkeys(repr(sorted(code.items())) if code else 'unknown' for code in codes))
    if len(versions) > 1:
        print(f'these runs were trained by {len(versions)} versions of the code; each is its own configuration '
              f'(code=1 to {len(versions)}): {code_differences(codes[0], next(c for c in codes if c != codes[0]) or {})}')
        configs = [f'{c} code={versions.index(repr(sorted(code.items())) if code else "unknown") + 1}'.strip()
                   for c, code in zip(configs, codes)]
    return [c or 'all runs' for c in configs]


def restore_pairs(state, dev, where):
    """A run's generators and discriminators from its checkpoint, each side with its origin."""
    hp = state['hyperparameters']
    pairs = make_pairs(hp, data_dim(hp['dataset']), dev, getattr(torch, hp['dtype']))
    load_pairs(pairs, state['pairs'], where)
    return pairs['G'], pairs['D']


@torch.no_grad()
def pool_errors(pairs, noises, chunk=1000):
    """errors[d, g]: the share of generator g's samples (of its run's noise) that discriminator d takes for real,
    D > 0.5, over every discriminator and every generator of every run, in run order."""
    Ds, columns = [D for _, D in pairs], []
    for (G, _), z in zip(pairs, noises):
        fooled = 0
        for part in z.split(chunk, dim=1):
            with evaluating(*Ds):
                fooled = fooled + torch.stack([torch.cat([(torch.sigmoid(D.model(sample.to(next(D.model.parameters()))))
                                                           > 0.5).sum((1, 2)) for D in Ds]) for sample in generate(G, part)], 1)
        columns.append(fooled)
    return torch.cat(columns, 1).double().cpu() / noises[0].shape[1]


def print_table(title, keys, rows, configs):
    """A markdown table of mean ± std over the runs of each configuration, one row of keys per run."""
    print(f'{title}\n| configuration | runs | ' + ' | '.join(keys) + ' |\n' + '|---' * (2 + len(keys)) + '|')
    table = []
    for config in dict.fromkeys(configs):
        mine = torch.tensor([[row[k] for k in keys] for row, c in zip(rows, configs) if c == config], dtype=torch.float64)
        spread = mine.std(0) if len(mine) > 1 else torch.zeros(len(keys), dtype=torch.float64)
        table.append({'configuration': config, 'runs': len(mine), **{k + s: v for k, m, d in zip(keys, mine.mean(0), spread)
                                                                     for s, v in (('', m.item()), ('_std', d.item()))}})
        print(f'| {config} | {len(mine)} | ' + ' | '.join(f'{m:.3f} ± {s:.3f}' for m, s in zip(mine.mean(0), spread)) + ' |')
    return table


def compare_runs(cfg):
    """--compare=folder: score every generator of every run with the pool of every run's discriminators (GAM-II);
    print the tables by configuration; write compare.csv, compare_matrix.csv, compare_generators.csv,
    compare_best.csv and compare.png in the folder."""
    folder, dev = cfg['compare'], pick_device(cfg['device'])
    if cfg['threads']:
        torch.set_num_threads(cfg['threads'])
    runs = find_runs(folder)
    configs = configurations(runs)
    pairs = [restore_pairs(state, dev, os.path.join(folder, name, 'checkpoint.pt')) for name, state in runs]
    run_of = torch.tensor([r for r, (G, _) in enumerate(pairs) for _ in G.origin])  # each slot's run
    print(f'comparing {len(runs)} runs ({len(run_of)} generators, as many discriminators) '
          f'on {cfg["eval_samples"]} samples per generator', flush=True)
    noises = [to_slots(draw_noise(state['hyperparameters'], cfg['eval_samples'], torch.Generator().manual_seed(
        cfg['seed']), getattr(torch, state['hyperparameters']['dtype'])), G).to(dev) for (_, state), (G, _) in zip(runs, pairs)]
    try:
        errors = pool_errors(pairs, noises)
        real = held_out_data(runs[0][1]['hyperparameters'], cfg['eval_samples'])
        real_error = torch.cat([1 - judge_real(D, as_inputs(real.to(dev), next(D.model.parameters()).dtype))[1]
                                for _, D in pairs])
    except RuntimeError as error:  # an edited network that does not take a sample alone
        refuse(f'--compare={folder}: cannot score the samples ({str(error).strip().splitlines()[0]})')
    names = [(f'{runs[r][0]}:G{g + 1}', f'{runs[r][0]}:D{d + 1}')  # slot by slot: the networks each holds
             for r, (G, D) in enumerate(pairs) for g, d in zip(G.origin, D.origin)]
    write_comparison(folder, errors, real_error, names, run_of, configs)
    best_of_runs(cfg, runs[0][1]['hyperparameters'], errors, run_of, [G for G, _ in pairs], noises, names, configs)
    return 0


def write_comparison(folder, errors, real_error, names, run_of, configs):
    """Per run, its generators' mean and worst (lowest) error rate over the pool and over other runs' discriminators,
    and its discriminators' error on fakes and real data: printed by configuration and written to compare.csv; the
    per-generator numbers to compare_generators.csv, the matrix to compare_matrix.csv and compare.png."""
    started_in = {d: slot for slot, (_, d) in enumerate(names)}  # 'run:Dk' -> its row (slot) in errors
    per_generator, per_run = [], []
    for g, (name, _) in enumerate(names):
        run, k = name.rsplit(':G', 1)
        others, d = run_of != run_of[g], started_in[f'{run}:D{k}']
        per_generator.append([run, k, *(f'{v:.6g}' for v in (
            errors[:, g].mean().item(), errors[others, g].mean().item() if others.any() else math.nan,
            errors[d].mean().item(), real_error[d].item()))])
    for r in range(len(configs)):
        mine, others, g = run_of == r, run_of != r, errors[:, run_of == r]
        g_others = g[others] if others.any() else torch.full((1, int(mine.sum())), math.nan, dtype=torch.float64)
        per_run.append({'g_mean': g.mean().item(), 'g_worst': g.min(0).values.mean().item(),
                        'g_mean_others': g_others.mean().item(), 'g_worst_others': g_others.min(0).values.mean().item(),
                        'd_fake_error': errors[mine].mean().item(), 'd_real_error': real_error[mine].mean().item()})
    table = print_table('error rate = share of samples a discriminator takes for real (fakes) or for fake (real test '
                        'data);\ngenerators: mean and worst (lowest) over the pool, and over other runs\' discriminators '
                        'only', list(per_run[0]), per_run, configs)
    write_csv(os.path.join(folder, 'compare.csv'), list(table[0]), table)
    write_csv(os.path.join(folder, 'compare_generators.csv'),
              ['run', 'generator', 'pool_error', 'pool_error_others', 'd_fake_error', 'd_real_error'], per_generator)
    write_csv(os.path.join(folder, 'compare_matrix.csv'), ['discriminator \\ generator', *(g for g, _ in names)],
              [[d, *(f'{v:.4g}' for v in row.tolist())] for (_, d), row in zip(names, errors)])
    save_comparison_plot(os.path.join(folder, 'compare.png'), errors, [configs[int(r)] for r in run_of])
    print(f'wrote {folder}/compare.csv, compare_generators.csv, compare_matrix.csv and compare.png')


def best_of_runs(cfg, hp, errors, run_of, Gs, noises, names, configs):
    """Algorithm 1's last step, "select the best GAN": each run's best generator by the pool (the highest share of
    its samples that the other runs' discriminators take for real; the whole pool's, for a lone run), with its own
    coverage and quality. Prints the per-configuration table and writes compare_best.csv."""
    fooled = torch.stack([errors[(run_of != run_of[g]) if len(set(run_of.tolist())) > 1 else slice(None), g].mean()
                          for g in range(len(run_of))])
    evaluator = Evaluator({**hp, **{k: cfg[k] for k in ('data_root', 'classifier_dir', 'eval_samples')}},
                          noises[0].device, noises[0].dtype, *training_data({**hp, 'data_root': cfg['data_root']}))
    rows = []
    for r, (G, z) in enumerate(zip(Gs, noises)):
        columns = (run_of == r).nonzero().flatten()
        best = int(columns[fooled[columns].argmax()])
        samples = generate(G, z)[best - int(columns[0])]
        rows.append({'run': names[best][0], 'configuration': configs[r], 'pool_error': fooled[best].item(),
                     **{k: v for k, v in evaluator.generator_metrics(samples).items() if k != 'histogram'}})
    keys = [k for k in ('pool_error', 'modes', 'modes_captured', 'high_quality', 'score', 'fd')
            if all(math.isfinite(row[k]) for row in rows)]
    print_table('the best generator of each run (by the pool): its error rate over the other runs\' discriminators, '
                'and its own metrics', keys, rows, configs)
    write_csv(os.path.join(cfg['compare'], 'compare_best.csv'), list(rows[0]), rows)
    print(f'wrote {cfg["compare"]}/compare_best.csv')


# ------------------------------------------------------------------------------------
# pictures

DPI = 80  # pixels per inch of every PNG


def save_figure(fig, path):
    """A figure as a PNG file, written whole or not at all."""
    plt = pyplot()
    try:
        with replacing(path) as tmp:
            fig.savefig(tmp, dpi=DPI, format='png')
    finally:
        plt.close(fig)


def pyplot():
    """matplotlib's pyplot, drawing to files only (no display needed)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def save_samples(path, samples, it, partners, real=None):
    """Images: a 4x4 grid of 16 samples per generator, each pixel drawn as 3x3 and the grids close together.
    2-D data: each generator's samples over the real points. samples[i]: generator i's (G1, G2, ... by the pair it
    started in), labelled with its current discriminator, partners[i] (by the pair that one started in)."""
    plt = pyplot()
    n = len(samples)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    if real is None:  # laid out in pixels: a grid of 118 x 118 pixels shown at 3x, with room for its title
        side, pad, title, top = 3 * (4 * 30 - 2), 9, 22, 26
        width, height = cols * (side + 2 * pad), top + rows * (title + side + pad)
        fig = plt.figure(figsize=(width / DPI, height / DPI))
        axes = [fig.add_axes(((c * (side + 2 * pad) + pad) / width, 1 - (top + r * (title + side + pad) + title + side) / height,
                              side / width, side / height)) for r in range(rows) for c in range(cols)]
    else:
        fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), squeeze=False)
        axes = axes.flat
    for ax in axes:
        ax.axis('off')
    for i, points in enumerate((samples if real is not None else as_unit_pixels(samples)).cpu().float()):
        ax = axes[i]
        if real is None:
            grid = torch.ones(4 * 30 - 2, 4 * 30 - 2)
            for k, image in enumerate(points[:16].reshape(16, 28, 28)):
                grid[30 * (k // 4):30 * (k // 4) + 28, 30 * (k % 4):30 * (k % 4) + 28] = image
            ax.imshow(grid.numpy(), cmap='Greys_r', vmin=0, vmax=1, interpolation='nearest')  # [0, 1]: as_unit_pixels
        else:
            ax.scatter(*real[:2000].T.numpy(), s=1, c='lightgrey')
            ax.scatter(*points.T.numpy(), s=1, c='C3')
            reach = 1.25 * float(real.abs().max())
            ax.set(xlim=(-reach, reach), ylim=(-reach, reach), aspect='equal')
        ax.set_title(f'G{i + 1}' + (f' (with D{partners[i] + 1})' if n > 1 else ''), fontsize=11, pad=4)
    fig.suptitle(f'iteration {it}', **({'y': 1 - 4 / height, 'va': 'top', 'fontsize': 12} if real is None else {}))
    save_figure(fig, path)


def save_comparison_plot(path, errors, config_of_column):
    """The (discriminator x generator) error-rate matrix as a heatmap, runs of one configuration side by side
    (the matrix's rows and columns follow the same runs, so one labelling serves both axes)."""
    plt = pyplot()
    order = sorted(range(len(config_of_column)), key=lambda i: config_of_column[i])
    labels = [config_of_column[i] for i in order]
    size = min(4 + 0.12 * len(order), 16)
    fig, ax = plt.subplots(figsize=(size + 2, size))
    image = ax.imshow(errors[order][:, order].numpy(), cmap='viridis', vmin=0, vmax=max(float(errors.max()), 1e-3))
    fig.colorbar(image, ax=ax, label='share of the generator\'s samples taken for real')
    starts = [i for i in range(len(labels)) if i == 0 or labels[i] != labels[i - 1]]
    for i in starts[1:]:
        ax.axhline(i - 0.5, color='white', lw=1)
        ax.axvline(i - 0.5, color='white', lw=1)
    centres = [(a + b - 1) / 2 for a, b in zip(starts, starts[1:] + [len(labels)])]
    ax.set_xticks(centres, [labels[i] for i in starts], rotation=30, ha='right', fontsize=8)
    ax.set_yticks(centres, [labels[i] for i in starts], fontsize=8)
    ax.set(xlabel='generators', ylabel='discriminators', title='GAM-II: error rate of every discriminator on every generator')
    fig.tight_layout()
    save_figure(fig, path)


def swaps_title(swaps, moved):
    """losses.png's title: how many swaps, and of which side's networks ('D', 'G' or both in moved)."""
    what = {'D': 'discriminators', 'G': 'generators'}.get(''.join(sorted(moved)), 'generators and discriminators')
    return 'no swaps' if not swaps else f'{len(swaps)} swaps of {what}' + (' (grey lines)' if len(swaps) <= 100
                                                                          else ', too dense to draw')


def save_losses(path, history, swaps, moved='D', most=2000, long=200):
    """Each pair's losses (every statistic whose name ends in _loss), a mean per log line, with the swaps of the sides
    that moved ('D', 'G' or both) marked; pair i is slot i. At most `most` points a curve (means of consecutive
    lines); beyond `long`, faint under a moving median per pair, the y range the bulk of the points (the axis says
    how many fall outside it)."""
    names = [name for name in (history[-1] if history else {}) if name.endswith('_loss')]
    history = [row for row in history if all(name in row for name in names)]  # not rows of an edit's other statistics
    if not names or not history:
        return
    plt = pyplot()
    from matplotlib.ticker import EngFormatter
    its = torch.tensor([row['iteration'] for row in history], dtype=torch.float64)
    values = torch.tensor([[row[name] for name in names] for row in history], dtype=torch.float64)  # (rows, names, pairs)
    faint = 'every log line' if len(its) <= most else f'means of {len(its) / most:.3g} log lines'
    if len(its) > most:  # consecutive rows averaged into `most` bins
        bins = torch.arange(len(its)) * most // len(its)
        count = torch.bincount(bins, minlength=most).double()
        its = torch.zeros(most, dtype=its.dtype).index_add_(0, bins, its) / count
        values = torch.zeros(most, *values.shape[1:], dtype=values.dtype).index_add_(0, bins, values) / count[:, None, None]
    smooth, window = len(its) > long, max(len(its) // 50, 2)
    fig, axes = plt.subplots(len(names), 1, figsize=(9, 3 * len(names)), sharex=True, squeeze=False)
    for ax, column, name in zip(axes[:, 0], range(len(names)), names):
        for i, pair in enumerate(values[:, column].T):
            ax.plot(its.numpy(), pair.numpy(), color=f'C{i}', lw=0.5 if smooth else 1, alpha=0.35 if smooth else 1,
                    label=None if smooth else f'pair {i + 1}')
            if smooth:  # a centred moving median: a lone spike does not move it
                medians = pair.unfold(0, window, 1).median(1).values
                ax.plot(its[window // 2:window // 2 + len(medians)].numpy(), medians.numpy(), color=f'C{i}', lw=1.6,
                        label=f'pair {i + 1}')
        off = 0
        if smooth:
            every = values[:, column].flatten()
            low, high = torch.quantile(every, torch.tensor([0.005, 0.995], dtype=every.dtype)).tolist()
            low, high = low - 0.1 * (high - low + 1e-9), high + 0.1 * (high - low + 1e-9)
            ax.set_ylim(low, high)
            off = int(((every < low) | (every > high)).sum())
        if len(swaps) <= 100:
            ax.vlines(swaps, 0, 1, transform=ax.get_xaxis_transform(), colors='grey', alpha=0.3, lw=0.8)
        ax.set_ylabel(name + (f' ({off} off the scale)' if off else ''))
        ax.legend(loc='upper right', fontsize=8)
    axes[-1, 0].set_xlabel('iteration' + (f' (faint: {faint}; bold: their moving median over {window})' if smooth else ''))
    axes[-1, 0].xaxis.set_major_formatter(EngFormatter(sep=''))
    axes[0, 0].set_title(swaps_title(swaps, moved))
    fig.tight_layout()
    save_figure(fig, path)


def save_metrics_plot(path, rows):
    """Modes covered, KL to uniform and Frechet distance over the run, a line per generator; and each
    discriminator's mean D(x) on real training (solid line, filled markers) and held-out (dashed, open) examples.
    Every evaluation is a marker, large while there are few (a single one is a point, with no line to show it)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    panels = (('modes', 'modes covered'), ('kl', 'KL(histogram || uniform)'), ('fd', 'Frechet distance'))
    ids = sorted({int(r['generator']) for r in rows})
    for g in ids:
        mine = [r for r in rows if int(r['generator']) == g]
        its = [int(r['iteration']) for r in mine]
        ms = 7 if len(its) <= 30 else 3
        for ax, (key, name) in zip(axes, panels):
            ax.plot(its, [float(r[key]) for r in mine], marker='o', ms=ms, label=f'G{g}')
            ax.set(title=name, xlabel='iteration')
        for key, style in (('d_train', '-'), ('d_heldout', '--')):
            axes[3].plot(its, [float(r[key] or 'nan') for r in mine], style, color=f'C{g - 1}', marker='o', ms=ms,
                         fillstyle='full' if key == 'd_train' else 'none',
                         label=f'D{g} {"train" if key == "d_train" else "held-out"}')
    axes[3].set(title='mean D(x): train (filled), held-out (open)', xlabel='iteration')
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


# ------------------------------------------------------------------------------------
# the run

def build_pairs(cfg, x_dim, dev, dtype):
    """make_pairs, or a refusal in one line where the networks cannot be built or a weight is not one per pair."""
    try:
        pairs = make_pairs(cfg, x_dim, dev, dtype)
    except ValueError as error:
        refuse(f'cannot build the networks: {error}')
    flat = [f'{name}.{k}' for name, side in pairs.items()
            for k, t in (*side.model.named_parameters(), *side.model.named_buffers()) if t.shape[:1] != (cfg['n_pairs'],)]
    if flat:
        refuse(f'{", ".join(flat)} has no leading pairs dimension: every weight of the networks is (n_pairs, ...); '
               f'use Linear, SpectralLinear (spectral norm per pair), BatchNorm, or PerPair(n, lambda: your_layer)')
    return pairs


def attempt(what, f, said):
    """f(), or, where an edited network cannot take what it is given, None and one line saying so (once: said)."""
    try:
        return f()
    except WriteFailed:  # a full disk or an unwritable out_dir is no edit's doing: the run stops (train)
        raise
    except Exception as error:  # an edited network: the run goes on, measuring what it still can
        if what not in said:
            said.add(what)
            procs.say(f'cannot {what}: {str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}')


class LossLog:
    """Every pair's step statistics since the last log line, and a row of means per log line so far ({'iteration':
    it, name: every pair's mean}): what a resumed run needs to log exactly as the uninterrupted one."""

    def __init__(self):
        self.names, self.recent, self.history = [], [], []

    def add(self, stats):
        """Record one iteration's statistics, {name: (pairs,)}."""
        self.names = list(stats)
        self.recent.append(torch.stack(list(stats.values()), 1))

    def unlogged(self):
        """Every pair's statistics since the last log line, (iterations, n_pairs, statistics) (every process calls it)."""
        return procs.gather(torch.stack(self.recent), dim=1) if self.recent else torch.zeros(0, 0, len(self.names))

    def close(self, it, unlogged):
        """Record the means of unlogged as iteration it's row, and start anew; returns that row."""
        means = dict(zip(self.names, unlogged.double().mean(0).T.cpu().tolist()))
        self.history.append({'iteration': it, **means})
        self.recent = []
        return means

    def state_dict(self, unlogged):
        return {'history': self.history, 'names': self.names, 'recent': unlogged.cpu()}

    def load_state_dict(self, state):
        self.history, self.names = state['history'], state['names']
        recent = state['recent'][:, procs.slots] if procs.world > 1 and len(state['recent']) else state['recent']
        self.recent = list(recent.to(procs.device))


class Training:
    """What a run trains and what a resume must find as it was: every pair's networks and optimisers (all pairs, in
    every process), the noise and data streams, the swaps and the sides they moved, the loss log and the last
    iteration done. state_dict() is what a checkpoint keeps, load_state_dict() a resume."""

    def __init__(self, cfg, images, labels, dev, dtype):
        # seeding: one seed, one stream per purpose, the same in every process: the weights from torch's global
        # generator, the data order seed + 1 (each pair's own, with own_noise), the noise and the input noise seed + 2,
        # the fixed noise of the sample grids seed + 3 (Recorder), each swap's pairing the seed and its iteration
        seed = cfg['seed']
        torch.manual_seed(seed)
        self.data = make_batches(used_for_training(images, cfg).to(dev), used_for_training(labels, cfg).to(dev), cfg,
                                 seed + 1, dtype)
        self.pairs = build_pairs(cfg, images.shape[1], dev, dtype)
        self.noise_rng = torch.Generator(device=dev).manual_seed(seed + 2)
        self.swaps, self.moved = [], set()  # the iterations after which networks moved; the sides that moved
        self.log, self.iteration = LossLog(), -1  # the last iteration done

    def state_dict(self, unlogged):
        """unlogged: every pair's statistics since the last log line (LossLog.unlogged)."""
        return {'iteration': self.iteration, 'swaps': self.swaps, 'moved': sorted(self.moved),
                'log': self.log.state_dict(unlogged), 'noise_rng': self.noise_rng.get_state(),
                'data': self.data.state_dict(), 'pairs': {name: side.state_dict() for name, side in self.pairs.items()}}

    def load_state_dict(self, state, where):
        load_pairs(self.pairs, state['pairs'], where)
        self.noise_rng.set_state(state['noise_rng'])
        self.data.load_state_dict(state['data'])
        self.log.load_state_dict(state['log'])
        self.iteration, self.swaps, self.moved = state['iteration'], state['swaps'], set(state['moved'])


def evaluates_at(it, cfg):
    """Whether iteration it is evaluated: every eval_every iterations, and the last one when the run reached one of
    those or eval_at_end asks (so a try-run shorter than eval_every never trains the classifier that scores it)."""
    every, last = cfg['eval_every'], cfg['iterations'] - 1
    return bool(every and it % every == 0 and it > 0 or it == last and (cfg['eval_at_end'] or every and last >= every))


class Recorder:
    """What a run shows and writes to out_dir after each iteration (only the leader process writes): log lines with
    the speed of training alone, evaluations (metrics.csv, metrics.png), sample grids of the fixed noise, the
    checkpoint and losses.png; and the Ctrl-C that ends a run after a checkpoint."""

    def __init__(self, cfg, training, share, images, labels, interrupted):
        dev, dtype = training.noise_rng.device, getattr(torch, cfg['dtype'])
        self.cfg, self.training, self.share, self.interrupted = cfg, training, share, interrupted
        self.iteration, self.said, self.origins = training.iteration, set(), [s.origin for s in share.values()]
        self.clock, self.since = time.perf_counter(), training.iteration + 1  # the speed since the last log line
        self.start = self.since  # the first line times this run's first iteration alone: a warm-up, no rate
        self.real = images[:2000] if cfg['dataset'] in MIXTURES else None  # drawn under 2-D samples
        n_fixed = 16 if self.real is None else 1000  # the same latent points in every sample grid
        self.fixed_z = draw_noise(cfg, n_fixed, torch.Generator().manual_seed(cfg['seed'] + 3), torch.float32).to(dev, dtype)
        self.digits = max(3, len(str(math.ceil((cfg['iterations'] - 1) / cfg['sample_every']))))  # 001.png ...
        evaluates = evaluates_at(cfg['iterations'] - 1, cfg)  # the last iteration does, when any does
        self.evaluator = Evaluator(cfg, dev, dtype, images, labels) if evaluates and procs.leader else None
        if self.evaluator:  # a fresh run starts a fresh file; a resumed one redoes the evaluations after its checkpoint
            write_metrics(self.path('metrics.csv'), [], keep_until=training.iteration)

    def path(self, name):
        return os.path.join(self.cfg['out_dir'], name)

    def after(self, it, stats):
        """Record iteration it's statistics ({name: (pairs,)}); log, evaluate and save where the schedule says.
        Returns whether to stop: interrupted, and saved."""
        cfg, training, last = self.cfg, self.training, self.cfg['iterations'] - 1
        training.iteration = self.iteration = it
        training.log.add(stats)
        origins = [side.origin for side in self.share.values()]
        if origins != self.origins:  # a swap moved the networks of a side, and their origins with them
            training.swaps.append(it)
            training.moved.update(name for name, now, then in zip(self.share, origins, self.origins) if now != then)
            self.origins = origins
        logging = it % cfg['log_every'] == 0 or it == last
        stopping = procs.anyone(self.interrupted) if logging or procs.world == 1 else False  # all processes agree
        if logging:
            unlogged = training.log.unlogged()
            self.stop_if_nonfinite(unlogged, it)
            now = time.perf_counter()
            rate = (it + 1 - self.since) / max(now - self.clock, 1e-9) if it > self.start else None
            self.clock, self.since = now, it + 1
            procs.say(format_log(it, training.log.close(it, unlogged), rate, (last - it) / max(rate or 1, 1e-9)))
        if evaluates_at(it, cfg) or it % cfg['sample_every'] == 0 or it == last or stopping:
            began = time.perf_counter()
            unlogged = training.log.unlogged()
            self.stop_if_nonfinite(unlogged, it)
            collect_pairs(training.pairs, self.share)  # under torchrun: every pair, in every process
            if evaluates_at(it, cfg):  # before the checkpoint: a resume from an earlier one redoes it
                self.evaluate(it)
            if it % cfg['sample_every'] == 0 or it == last or stopping:
                self.save(it, unlogged)
            self.clock += time.perf_counter() - began  # the speed is training's alone
        if stopping:
            procs.say(f'interrupted: checkpoint saved after iteration {it}; continue with --resume=True')
        if stopping or it == last:
            self.losses()
        return stopping

    def evaluate(self, it):
        """Score every generator and discriminator (the leader's copy of every pair must be up to date)."""
        if self.evaluator:
            rows = self.evaluator(self.training.pairs, it)
            write_metrics(self.path('metrics.csv'), rows, keep_until=it - 1)
            save_metrics_plot(self.path('metrics.png'), read_csv(self.path('metrics.csv')))
            procs.say(format_eval(rows, len(mixture(self.cfg['dataset'])[0]) if self.cfg['dataset'] in MIXTURES else 10))

    def save(self, it, unlogged):
        """The sample grid of iteration it, then the checkpoint; never of non-finite weights."""
        if not procs.leader:
            return
        pairs = self.training.pairs
        bad = [name for name, side in pairs.items() if not all(p.isfinite().all() for p in side.model.parameters())]
        if bad:
            self.stop(f'a weight of {" and ".join(bad)} became non-finite by iteration {it}')
        attempt('draw the sample grid', lambda: self.samples(it), self.said)
        save_checkpoint(checkpoint_path(self.cfg), {'hyperparameters': self.cfg, 'block': block_values,
                                                    'code': algorithm_code(), 'device': self.fixed_z.device.type,
                                                    **self.training.state_dict(unlogged)})

    def samples(self, it):
        G, D = self.training.pairs['G'], self.training.pairs['D']
        order = [G.origin.index(g) for g in range(len(G.origin))]  # the slot of G1, G2, ...
        save_samples(self.path(f'{math.ceil(it / self.cfg["sample_every"]):0{self.digits}d}.png'),
                     generate(G, to_slots(self.fixed_z, G))[order], it, [D.origin[slot] for slot in order], self.real)

    def losses(self):
        if procs.leader:
            save_losses(self.path('losses.png'), self.training.log.history, self.training.swaps, self.training.moved)

    def stop_if_nonfinite(self, unlogged, it):
        bad = (~torch.isfinite(unlogged)).any(2).nonzero()
        if len(bad):
            self.stop(f'a statistic of pair {int(bad[0, 1]) + 1} became non-finite at iteration '
                      f'{it - len(unlogged) + 1 + int(bad[0, 0])}')

    def stop(self, message):
        self.losses()
        sys.exit(f'parallel_gan.py: {message}; stopped. The last good checkpoint ({checkpoint_path(self.cfg)}) is '
                 f'untouched.')


def format_log(it, means, rate, left):
    """One line: the iteration, each statistic of every pair (1/2/...) as means since the previous line, the speed."""
    eta = f'{int(left // 3600)}h{int(left % 3600 // 60):02d}m' if left >= 3600 else f'{int(left // 60)}m{int(left % 60):02d}s'
    columns = ' | '.join(f'{name} {"/".join(f"{v:.3f}" for v in values)}' for name, values in means.items())
    return f'it {it:>7} | {columns} | ' + ('first iteration' if rate is None else f'{rate:.0f} it/s, {eta} left')


RUN_FILES = ('checkpoint.pt', 'NNN.png', 'losses.png', 'metrics.csv', 'metrics.png')  # all a run writes in out_dir
# but .lock, which goes with it (out_dir may also hold the caches of data_root and classifier_dir: never the run's)


@contextmanager
def claim_out_dir(cfg):
    """Make out_dir and lock it while the run lives; refuse one that a live run is using, and, for a fresh run, one
    that holds another run's checkpoint. The lock is the kernel's (flock): a run that dies in any way, kill -9 or
    power loss, leaves nothing that blocks the next one; and a run that ends in any other way (done, an error,
    Ctrl-C, sys.exit, SIGTERM) removes .lock as it goes. Yields the open lock file."""
    out = cfg['out_dir']
    path = os.path.join(out, '.lock')
    while True:
        try:
            os.makedirs(out, exist_ok=True)
            lock = open(path, 'a+')
        except OSError as error:
            raise WriteFailed(f'cannot use --out_dir={out} ({error.strerror or error})') from error
        if not fcntl:
            break
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or 'unknown'
            lock.close()
            refuse(f'--out_dir={out} is in use by another run (process {holder}); '
                   f'let it finish, stop it, or choose another --out_dir')
        with suppress(OSError):
            if os.path.samestat(os.fstat(lock.fileno()), os.stat(path)):
                break
        lock.close()  # the run before removed this .lock as it ended, after we opened it: lock the next one

    def terminated(signum, frame):  # a plain kill (SIGTERM) ends the run as an exception would, so .lock goes too
        raise SystemExit(128 + signum)
    before = signal.getsignal(signal.SIGTERM)
    if before == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, terminated)
    try:
        lock.seek(0)
        lock.truncate()
        lock.write(f'{os.getpid()}\n')
        lock.flush()
        checkpoint = checkpoint_path(cfg)
        if not cfg['resume'] and os.path.exists(checkpoint):
            try:
                where = f'stopped after iteration {torch.load(checkpoint, map_location="cpu", weights_only=True)["iteration"]}'
            except Exception:
                where = 'left an unreadable checkpoint.pt'
            refuse(f'--out_dir={out} holds another run, which {where}: continue it with --resume=True, start afresh '
                   f'with another --out_dir, or remove that run\'s own files from it ({", ".join(RUN_FILES)})')
        yield lock
    finally:
        if signal.getsignal(signal.SIGTERM) is terminated:  # not when the run set its own since
            signal.signal(signal.SIGTERM, before)
        with suppress(OSError):
            os.remove(path)  # while still locked: once unlocked, it may be the next run's
        lock.close()  # releases the lock at once, also where train() was called from Python and goes on


@contextmanager
def interrupts_caught():
    """Ctrl-C (or torchrun's SIGTERM) finishes the current iteration, then saves; a second Ctrl-C stops at once.
    Yields the list that records them; the default handlers come back on leaving, except one: when a collective
    failed (another process died), torchrun's SIGTERM to the survivors follows at once, and it is ignored so
    that it cannot cut short the report of what happened."""
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
    dev = procs.start(cfg)
    try:
        with claim_out_dir(cfg) if procs.leader else nullcontext():  # before any slow step; held until the end
            status = run(cfg, dev)
        procs.close(finished=True)
    except WriteFailed as failure:
        sys.exit(f'parallel_gan.py: {failure}; stopped. {what_is_left(cfg)}')
    except RuntimeError as error:  # a collective failed: another process died or hung
        if procs.world == 1:
            raise
        print(f'parallel_gan.py: process {procs.rank} lost the other processes ({str(error).splitlines()[0]}); '
              f'stopped. {what_is_left(cfg)}', file=sys.stderr, flush=True)
        procs.close(finished=False)  # said first: tearing down after a loss can take a while
        sys.exit(1)
    return status


def count(n, noun):
    """'1 process', '2 processes', '4 threads'."""
    return f'{n} {noun}' + ('' if n == 1 else 'es' if noun.endswith('s') else 's')


def what_is_left(cfg):
    path = checkpoint_path(cfg)
    return (f'The last checkpoint, {path}, is intact.' if os.path.exists(path)
            else f'No checkpoint had been written to {cfg["out_dir"]} yet.')


def run(cfg, dev):
    """Set a run up (afresh or from its checkpoint) and train it; 0 when done, 130 when interrupted (and saved)."""
    dtype, say = getattr(torch, cfg['dtype']), procs.say
    if cfg['threads']:
        torch.set_num_threads(cfg['threads'])
    state = load_checkpoint(checkpoint_path(cfg), cfg, dev) if cfg['resume'] else None
    if state and state['iteration'] + 1 >= cfg['iterations']:
        say(f'nothing to train: the run in {cfg["out_dir"]} stopped after iteration {state["iteration"]}, and it already '
            f'reached --iterations={cfg["iterations"]}; raise it to go on')
        return 0
    say(f'loading the {cfg["dataset"]} training set' + (f' from {cfg["data_root"]}' if cfg['dataset'] in IMAGE_DATASETS else ''))
    images, labels = training_data(cfg)
    training = Training(cfg, images, labels, dev, dtype)
    if state:
        training.load_state_dict(state, checkpoint_path(cfg))  # refuses other networks
        saved = state['hyperparameters']
        changes = '; '.join(f'{k}={saved[k]!r} there, {cfg[k]!r} now' for k in RESUMABLE
                            if k != 'resume' and k in saved and saved[k] != cfg[k])
        say(f'resumed from {checkpoint_path(cfg)} after iteration {state["iteration"]}'
            + (f', with these changes: {changes}' if changes else ', with its own hyperparameters'))
    share = share_of_process(training.pairs, cfg, images.shape[1])  # under torchrun, this process's pairs
    with interrupts_caught() as interrupted:  # from here on a Ctrl-C ends in a checkpoint
        recorder = Recorder(cfg, training, share, images, labels, interrupted)
        say(f'GAP: {cfg["n_pairs"]} pairs, K={cfg["K"]}, {len(training.data.data)} {cfg["dataset"]} training points, '
            f'device {dev}, {cfg["dtype"]}, {count(procs.world, "process")} x {count(torch.get_num_threads(), "thread")}, '
            f'iterations {training.iteration + 1}..{cfg["iterations"] - 1}')
        if cfg['eval_every'] and not recorder.evaluator:
            say(f'no evaluation: the run ends before eval_every={cfg["eval_every"]}; for metrics of a short run, '
                f'add --eval_at_end=True (or a smaller --eval_every)')
        stopped = train_loop(cfg, share, training.data, training.noise_rng, recorder)
    return 130 if stopped else 0


if __name__ == '__main__':
    cfg = parse_args(sys.argv[1:])
    status = compare_runs(cfg) if cfg['compare'] else train(cfg)
    if int(os.environ.get('WORLD_SIZE', 1)) > 1:  # under torchrun, a finished process skips the interpreter's
        sys.stdout.flush()  # teardown, where a gloo thread still running as C++ statics are destroyed can abort it
        sys.stderr.flush()  # (std::terminate, exit status -6) after the run and its files are complete
        os._exit(status)
    sys.exit(status)
