"""
Generative Adversarial Parallelization (GAP) on MNIST, Fashion-MNIST and 2-D mixtures.

Im, Ma, Kim & Taylor, "Generative Adversarial Parallelization", arXiv:1612.04021.
Several GANs train side by side on the same data; every K iterations their
discriminators change partners, so no generator stays coupled to one
discriminator. K=0 never swaps: independent GANs, the baseline GAP is compared with.

    python parallel_gan.py                      # the reference run: 2 pairs, K=100, MNIST
    python parallel_gan.py --K=0 --n_pairs=4    # override any hyperparameter below
    python parallel_gan.py --paper=True         # the paper's training conditions (see --help)
    python parallel_gan.py --help               # list them all
    torchrun --nproc_per_node=2 parallel_gan.py # one pair per process, as in the paper
    python parallel_gan.py --compare=out/runs   # judge every run's generators by every run's discriminators

Writes out/NNN.png (samples from a fixed noise batch), out/losses.png, out/metrics.csv
and out/metrics.png (mode coverage, sample quality, discriminators on training and held-out
data), and out/checkpoint.pt (resume with --resume=True).

Where things are, top to bottom. The algorithm: the hyperparameters; the networks (generator and
discriminator, each a list of layers over every pair at once); the losses (d_loss, g_loss); every pair's
step (train_step); the swap (swaps_at, new_partners, swap_discriminators, swap_networks); one iteration
(gap_iteration) and the training loop (train_loop). Then, below one divider, the support: the command line; the data;
the fast written-out backward and the start-up check that decides whether it or autograd trains
(check_backward); files and checkpoints; the evaluation (Evaluator); comparing runs (compare_runs);
pictures; the processes of a torchrun launch (Processes); the run (train, run, Training, Recorder);
and CUDA graphs of the quiet iterations on a GPU (GraphedIterations).
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
import tokenize
import zlib
from contextlib import contextmanager, nullcontext, redirect_stderr, redirect_stdout, suppress
from io import StringIO

try:
    import fcntl  # locks out_dir against a second run; not on Windows, where out_dir is not locked
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
paper = False  # set all six below as the paper does: own_noise, prior mixed, input_noise 0.1 (our amount: the paper gives none), clip 1, swap matching, batch_norm (values given on the command line win)
own_noise = False  # each pair draws its own noise and its own minibatch order (each example still once per epoch)
prior = 'gaussian'  # the generators' noise: 'gaussian', 'uniform' (on [-1, 1]) or 'mixed' (first half of the pairs Gaussian, the rest uniform)
input_noise = 0.0  # std of Gaussian noise added to every discriminator input, real and fake, in training; decays linearly to 0 at the last iteration
clip = 0.0  # clip each network's gradient (each G and each D on its own) to this norm before its step (0: never)
swap = 'derangement'  # 'derangement' (every discriminator moves, to a random other generator) or 'matching' (Algorithm 1: n_pairs/2 random pairs exchange theirs; odd n_pairs: one sits out)
batch_norm = False  # batch normalisation after every hidden linear layer of G and D (the paper's toy networks)
# output
log_every = 1000  # print a log line (means since the previous one) every this many iterations
sample_every = 1000  # write out/NNN.png and the checkpoint every this many iterations
out_dir = 'out'  # where samples, plots and the checkpoint go
resume = False  # continue from out_dir/checkpoint.pt exactly where it stopped
resume_edited = False  # resume also when the algorithm's code (networks, losses, step, swap, loop) differs from the run's
# data
dataset = 'mnist'  # 'mnist', 'fashion_mnist', or the 2-D Gaussian mixtures 'ring8', 'grid25' and 'r15'
data_root = 'out/data'  # MNIST lives in data_root/MNIST/raw, Fashion-MNIST in data_root/FashionMNIST/raw
train_size = 0  # train on only the first this many training examples (0: all of them)
# evaluation: mode coverage and sample quality, GAP against no-swap
eval_every = 10_000  # evaluate every this many iterations, and at the end of a run that reached one (0: never)
eval_at_end = False  # evaluate at the end also a run shorter than eval_every (images: trains the scoring classifier once, then cached)
eval_samples = 10_000  # samples per generator in each evaluation
classifier_dir = 'out/classifiers'  # where the classifier that scores image samples is cached
compare = ''  # a folder of runs: score every generator with every run's discriminators, train nothing
# system
device = 'auto'  # 'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'
dtype = 'float32'  # 'float32' or 'float64' for every weight and computation
cuda_graphs = True  # on a GPU, replay captured CUDA graphs of the iterations (False: launch every kernel, to debug)
threads = 0  # CPU threads torch may use (0: torch's default)
# --- end of hyperparameters ---------------------------------------------------------

PAPER = {'own_noise': True, 'prior': 'mixed', 'input_noise': 0.1, 'clip': 1.0, 'swap': 'matching',
         'batch_norm': True}  # what paper=True sets (clip 1: the authors' code, hma02/GAN-evaluation)


# ------------------------------------------------------------------------------------
# the networks. All pairs' networks of one side are one module whose every weight has a leading pairs
# dimension, so every pair runs in the same batched product; activations are (n_pairs, batch, features).
# Edit generator() and discriminator() as you would an nn.Sequential: any layer works (autograd trains what
# has no written-out backward; the start-up check says which), and PerPair makes any torch module per pair.

# What the data are and the generators emit, in one place: image pixels in PIXELS, made by the output layer
# IMAGE_OUTPUT (for [-1, 1]: nn.Tanh, (-1.0, 1.0)); 2-D mixtures are points in their own coordinates.
IMAGE_OUTPUT, PIXELS = nn.Sigmoid, (0.0, 1.0)


class Linear(nn.Module):
    """n_pairs independent nn.Linear(fan_in, fan_out) layers, initialised as nn.Linear is:
    weight (n_pairs, fan_in, fan_out), bias (n_pairs, 1, fan_out)."""

    def __init__(self, n, fan_in, fan_out):
        super().__init__()
        bound = 1 / math.sqrt(fan_in)
        self.weight = nn.Parameter(torch.empty(n, fan_in, fan_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, 1, fan_out).uniform_(-bound, bound))

    def forward(self, x):
        return torch.baddbmm(self.bias, x, self.weight)


class SpectralLinear(Linear):
    """Linear with every pair's weight divided by its own largest singular value (spectral normalisation), estimated
    as torch's spectral_norm does: one step of power iteration per forward pass in training. Its vectors u and v are
    per pair (buffers), so each discriminator keeps its own estimate, takes it along at a swap and into the
    checkpoint. Trains through autograd."""

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
        sigma = v @ self.weight @ u.transpose(1, 2)  # (n_pairs, 1, 1)
        return torch.baddbmm(self.bias, x, self.weight / sigma)


class BatchNorm(nn.Module):
    """n_pairs independent nn.BatchNorm1d(features, track_running_stats=False): each pair normalises over its own
    batch, in training and evaluation alike. Running statistics would mix D's real and fake batches, which
    training normalises apart, so they would judge neither. torch's batch_norm with every pair's features side by
    side, so that each pair's maths is nn.BatchNorm1d's."""

    def __init__(self, n, features, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n, 1, features))
        self.bias = nn.Parameter(torch.zeros(n, 1, features))

    def forward(self, x):
        n, batch, features = x.shape
        side_by_side = x.transpose(0, 1).reshape(batch, n * features)
        out = F.batch_norm(side_by_side, None, None, self.weight.view(-1), self.bias.view(-1), True, 0.0, self.eps)
        return out.reshape(batch, n, features).transpose(0, 1)


class PerPair(nn.Module):
    """n_pairs independent copies of any torch module (a convolution, a block, ...), each made by make() and run
    side by side by torch.func.vmap: every weight gets its leading pairs dimension. Trains through autograd."""

    def __init__(self, n, make):
        super().__init__()
        copies = [make() for _ in range(n)]
        if any(parametrised(m) for copy in copies for m in copy.modules()):  # refuse: one line, exit status 2
            refuse('PerPair cannot stack parametrised modules (spectral_norm, weight_norm, ...): their copies are '
                   'of different classes; for spectral norm per pair, use SpectralLinear(n, fan_in, fan_out) in place '
                   'of Linear (README: Editing the script)')
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


def parametrised(module):
    """Whether a module's weights are made by torch.nn.utils.parametrize or the older weight hooks (spectral_norm)."""
    hooks = [type(hook).__name__ for hook in module._forward_pre_hooks.values()]
    return nn.utils.parametrize.is_parametrized(module) or any(name in ('SpectralNorm', 'WeightNorm') for name in hooks)


class Networks(nn.Sequential):
    """One side's n_pairs networks as one sequence of pair-batched layers. An input shared by every pair,
    (batch, features) or (1, batch, features), is fed to each."""

    def __init__(self, *layers):
        super().__init__(*layers)
        self.n_pairs = next(self.parameters()).shape[0]
        # whether each example's output depends on that example alone (no batch statistics), so that real and fake
        # batches may share one forward pass
        self.per_example = not any(isinstance(m, (BatchNorm, nn.modules.batchnorm._BatchNorm)) for m in self.modules())

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
    output = [] if cfg['dataset'] in MIXTURES else [IMAGE_OUTPUT()]  # 2-D points (MIXTURES): a linear output
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


def make_pairs(cfg, x_dim, dev, dtype, n=None, written_out=None):
    """G: all generators, D: all discriminators; each side {'model': its Networks, 'solver': its Adam,
    'written_out': whether the written-out backward trains it, else autograd; what check_backward confirmed,
    unless written_out ({'G': ..., 'D': ...}) says; 'origin': origin[i], the pair that the network now in slot i
    started in, which a swap moves with it (of every pair, also where a process holds only some)}. One Adam over
    a side is one Adam per network: Adam's update is elementwise."""
    # written_out_confirmed: the sides whose written-out backward check_backward confirmed at start-up (support part)
    n, chosen = n or cfg['n_pairs'], written_out_confirmed if written_out is None else written_out
    sides = []
    for name, model in (('G', generator(n, cfg, x_dim)), ('D', discriminator(n, cfg, x_dim))):
        model.to(dev, dtype)
        by_hand = chosen.get(name, False)
        for p in model.parameters():
            p.requires_grad_(not by_hand)
            p.grad = torch.zeros_like(p)
        # Adam: torch's Adam (betas beta1, 0.999), one fused call per side (support part)
        sides.append({'model': model, 'solver': Adam(model.parameters(), lr=cfg['lr'], beta1=cfg['beta1']),
                      'written_out': by_hand, 'origin': list(range(cfg['n_pairs']))})
    return sides


# ------------------------------------------------------------------------------------
# the GAN losses, from D's logits: log D = -softplus(-logit), log(1 - D) = -softplus(logit),
# so they cannot overflow to inf or NaN the way log(sigmoid) can.

def d_loss(real_logit, fake_logit):
    """-mean(log D(x) + log(1 - D(G(z)))), one value per pair."""
    return F.softplus(-real_logit).mean((1, 2)) + F.softplus(fake_logit).mean((1, 2))


def g_loss(fake_logit):
    """-mean(log D(G(z))), one value per pair (the non-saturating generator loss)."""
    return F.softplus(-fake_logit).mean((1, 2))


def loss_and_logit_grads(loss, *logits):
    """A loss (one value per pair) and its gradients with respect to the logits, by autograd on those small
    tensors (or the closed form that check_losses verified for it): whatever d_loss and g_loss say is what
    trains. Each pair's loss depends on its own logits only, so the gradient of the sum is every pair's own."""
    if loss in verified_closed_forms:  # {loss: its gradient in closed form}, each confirmed by check_losses
        logits = [logit.detach() for logit in logits]
        return loss(*logits), verified_closed_forms[loss](*logits)
    leaves = [logit.detach().requires_grad_() for logit in logits]
    with torch.enable_grad():
        value = loss(*leaves)
        return value.detach(), torch.autograd.grad(value.sum(), leaves)


# ------------------------------------------------------------------------------------
# every pair's step: forward and backward through each side's networks, by its written-out backward
# (fast) or by autograd (whatever the layers are)

def forward(side, x, inputs=False):
    """(output, tape) of side's networks on x; the tape is what backward needs: every layer's output for the
    written-out backward, else x as a leaf of autograd's graph (requiring grad if inputs)."""
    if side['written_out']:  # the same layers, keeping each one's output (support part: the written-out backward)
        return forward_saving(side['model'], x)
    x = x.detach().requires_grad_(inputs)
    with torch.enable_grad():
        return side['model'](x), x


def backward(side, outputs, tape, grads, weights=True, inputs=False):
    """Given d(loss)/d(output) for each output of forward, set d(loss)/d(weight) as each weight's .grad (if
    weights) and return d(loss)/d(input) (if inputs)."""
    if side['written_out']:  # each layer's gradient by hand, layer by layer back (the support part)
        return backward_written_out(side['model'], tape, grads[0], weights, inputs)
    params = list(side['model'].parameters()) if weights else []
    found = torch.autograd.grad(outputs, params + ([tape] if inputs else []), grads, allow_unused=True)
    for p, grad in zip(params, found):
        p.grad = torch.zeros_like(p) if grad is None else grad
    return found[-1] if inputs else None


def with_noise(t, added):
    return t if added is None else t + added


def d_step(D, x, fake, input_noise):
    """D's gradients of d_loss on the real batch x and the fakes, each plus its input noise. Returns D_loss and
    D's probabilities (n_pairs, 2 * batch, 1), real ones first. Real and fake run as one pass where D has no
    batch statistics, else as two."""
    real_in, fake_in = with_noise(x, input_noise[0]).expand(len(fake), -1, -1), with_noise(fake, input_noise[1])
    if D['model'].per_example:
        logit, tape = forward(D, torch.cat([real_in, fake_in], 1))
        D_loss, grads = loss_and_logit_grads(d_loss, logit[:, :fake.shape[1]], logit[:, fake.shape[1]:])
        backward(D, [logit], tape, [torch.cat(grads, 1)])
    else:  # batch norm: the real and the fake batch are normalised apart, as two forward passes would
        real_logit, fake_logit = forward(D, real_in)[0], forward(D, fake_in)[0]
        D_loss, grads = loss_and_logit_grads(d_loss, real_logit, fake_logit)
        backward(D, [real_logit, fake_logit], None, list(grads))
        logit = torch.cat([real_logit, fake_logit], 1)
    return D_loss, torch.sigmoid(logit.detach())


def g_step(G, D, fake, G_tape, input_noise):
    """G's gradients of g_loss, D scoring G's samples fake (G's output, with G's tape) plus their input noise;
    D's weights are left alone."""
    logit, D_tape = forward(D, with_noise(fake.detach(), input_noise), inputs=True)
    G_loss, (grad_logit,) = loss_and_logit_grads(g_loss, logit)
    grad_fake = backward(D, [logit], D_tape, [grad_logit], weights=False, inputs=True)
    backward(G, [fake], G_tape, [grad_fake])
    return G_loss


def clip_gradients(side, max_norm):
    """Scale each network's gradient to norm max_norm where it is longer (torch.nn.utils.clip_grad_norm_ on each
    network of the side on its own)."""
    grads = [p.grad for p in side['model'].parameters()]
    norms = torch.stack([g.flatten(1).square().sum(1) for g in grads]).sum(0).sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view(-1, *[1] * (g.dim() - 1)))


def train_step(G, D, z, x, input_noise=(None, None, None), clip=0.0):
    """One training step of every pair at once, a D step then a G step against the just-updated D (gap_iteration
    draws the batch and noise and makes the swap). z and x: (batch, dim) shared by every pair, or (n_pairs, batch,
    dim) each pair its own; input_noise: what is added to D's real, fake and G-step inputs. Pair i's losses reach
    only pair i's networks.

    Returns (n_pairs, 4): D_loss, G_loss, mean D(x), mean D(G(z)) of the D step."""
    fake, G_tape = forward(G, z)  # each G runs once; the G step below reuses it
    D_loss, D_prob = d_step(D, x, fake.detach(), input_noise)
    if clip:
        clip_gradients(D, clip)
    D['solver'].step()
    G_loss = g_step(G, D, fake, G_tape, input_noise[2])
    if clip:
        clip_gradients(G, clip)
    G['solver'].step()
    batch = fake.shape[1]
    return torch.stack([D_loss, G_loss, D_prob[:, :batch].mean((1, 2)), D_prob[:, batch:].mean((1, 2))], 1)


# ------------------------------------------------------------------------------------
# the GAP swap

def swaps_at(it, cfg):
    """Whether the discriminators change partners after iteration it: every K iterations (K=0: never). The one
    place that says so: the loop, the CUDA-graph planner and losses.png ask it. A random schedule stays
    resumable when it draws from a purpose of its own, random_stream(cfg, it, 'when')."""
    return cfg['K'] > 0 and it > 0 and it % cfg['K'] == 0


def random_stream(cfg, it, purpose):
    """A generator seeded by the run's seed, the iteration and a purpose alone: a resumed run draws the same."""
    return torch.Generator().manual_seed((cfg['seed'] * 1_000_003 + it) * 31 + zlib.crc32(purpose.encode()) % 31)


def new_partners(cfg, it):
    """The pairing after a swap at iteration it: generator i gets the discriminator at partners[i].

    'derangement': a random permutation in which no discriminator stays with its generator (with two pairs, an
    exchange); 'matching': the paper's Algorithm 1, n_pairs/2 random pairs (i, j) drawn without replacement
    exchange their discriminators (with an odd number of pairs, one sits the swap out)."""
    n, rng = cfg['n_pairs'], random_stream(cfg, it, 'swap')
    if cfg['swap'] == 'matching':
        order, partners = torch.randperm(n, generator=rng), torch.arange(n)
        partners[order[0:n - 1:2]], partners[order[1:n:2]] = order[1:n:2], order[0:n - 1:2]
        return partners
    while True:
        partners = torch.randperm(n, generator=rng)
        if (partners != torch.arange(n)).all():
            return partners


def swap_discriminators(D, partners, procs=None):
    """GAP's swap: each discriminator moves to another generator; generator i now trains against the
    discriminator that was at partners[i]. (swap_networks(G, partners, procs) would move the generators instead.)"""
    swap_networks(D, partners, procs)


@torch.no_grad()
def swap_networks(side, partners, procs=None):
    """Every network of one side, with its Adam state (and its buffers, such as SpectralLinear's estimate), and
    its origin: slot i now holds the network that was in slot partners[i].

    Across processes (procs), each process first gathers every process's networks of that side,
    then keeps the ones its own slots get."""
    take = partners if procs is None else partners[procs.slots]
    gather = (lambda t: t) if procs is None else procs.gather
    model = side['model']
    dev = next(model.parameters()).device
    take = take.pin_memory().to(dev, non_blocking=True) if dev.type == 'cuda' else take  # no host sync
    for p in model.parameters():
        state = side['solver'].state[p]  # Adam's 'step' is the same for every network of a side
        for tensor in (p, state['exp_avg'], state['exp_avg_sq']):
            tensor.copy_(gather(tensor)[take])
    for buffer in model.buffers():
        buffer.copy_(gather(buffer)[take])
    side['origin'] = [side['origin'][j] for j in partners.tolist()]  # every pair's, in every process


# ------------------------------------------------------------------------------------
# the training loop

def draw_noise(cfg, batch, rng, dtype):
    """Each generator's noise from its prior: (n_pairs, batch, z_dim), or (1, batch, z_dim) shared by every pair."""
    n = cfg['n_pairs']
    shape = (n if cfg['own_noise'] else 1, batch, cfg['z_dim'])
    gaussian = lambda: torch.randn(shape, generator=rng, device=rng.device, dtype=dtype)
    uniform = lambda: torch.rand(shape, generator=rng, device=rng.device, dtype=dtype) * 2 - 1
    if cfg['prior'] != 'mixed':
        return gaussian() if cfg['prior'] == 'gaussian' else uniform()
    first, rest = gaussian().expand(n, -1, -1), uniform().expand(n, -1, -1)
    return torch.cat([first[:n // 2], rest[n // 2:]])  # the first half of the generators Gaussian, the rest uniform


def to_slots(z, G):
    """Noise drawn per generator (row k: generator k's, from its prior) routed to the slots the generators hold now
    (G['origin']); as it is where every slot shares one row or no generator has moved (slices: no host copy)."""
    if len(z) == 1 or G['origin'] == list(range(len(z))):
        return z
    return torch.stack([z[g] for g in G['origin']])


def input_noise_of(cfg, it, x_dim, rng, dtype):
    """The noise added to D's real, fake and G-step inputs at iteration it: std input_noise decaying linearly to 0
    at the last iteration, each pair its own draws; (None, None, None) without."""
    if not cfg['input_noise']:
        return None, None, None
    std = cfg['input_noise'] * (1 - it / max(cfg['iterations'] - 1, 1))
    return tuple(std * torch.randn(cfg['n_pairs'], cfg['mb_size'], x_dim, generator=rng, device=rng.device,
                                   dtype=dtype) for _ in range(3))


def own_share(t, procs):
    """This process's pairs' part of a tensor that holds every pair's (n_pairs, batch, ...); one shared by every pair,
    (1 or batch, ...), as it is."""
    if procs is None or procs.world == 1 or t is None or t.dim() < 3 or len(t) == 1:
        return t
    return t[procs.slots.to(t.device)]


def gap_iteration(it, G, D, batches, noise_rng, cfg, procs=None):
    """Iteration it of the training loop: fresh noise and a batch, every pair's step, and a swap where swaps_at
    says. Returns train_step's stats and the swap's partners (None without a swap). Every process draws every
    pair's noise and batches, and keeps its own pairs'."""
    dtype = getattr(torch, cfg['dtype'])
    z = own_share(to_slots(draw_noise(cfg, cfg['mb_size'], noise_rng, dtype), G), procs)
    x = own_share(as_inputs(batches.next(), dtype), procs)  # as_inputs: stored data (uint8 pixels) as D's inputs
    input_noise = tuple(own_share(t, procs) for t in input_noise_of(cfg, it, x.shape[-1], noise_rng, dtype))
    stats = train_step(G, D, z, x, input_noise, cfg['clip'])
    if not swaps_at(it, cfg):
        return stats, None
    partners = new_partners(cfg, it)
    swap_discriminators(D, partners, procs)
    return stats, partners


def evaluates_at(it, cfg):
    """Whether iteration it is evaluated: every eval_every iterations, and the last one when the run reached one of
    those or eval_at_end asks (so a try-run shorter than eval_every never trains the classifier that scores it)."""
    every, last = cfg['eval_every'], cfg['iterations'] - 1
    return bool(every and it % every == 0 and it > 0 or it == last and (cfg['eval_at_end'] or every and last >= every))


def train_loop(cfg, procs, training, G, D, recorder, interrupted):
    """Train G and D (this process's pairs) from training's next iteration to the last, logging, evaluating
    and saving on schedule. Returns whether an interrupt stopped it (after a checkpoint)."""
    log, last, it = training.log, cfg['iterations'] - 1, training.iteration
    speed, stopping = Speed(it + 1), False  # Speed: iterations per second, saving and evaluating not counted
    # iteration_runner: gap_iteration, one iteration per call (on a GPU, replays of captured CUDA graphs of it)
    advance = iteration_runner(G, D, training.batches, training.noise_rng, cfg, procs)
    while it < last:
        origins = G['origin'], D['origin']
        stats, partners = advance(it + 1)  # (iterations done, pairs, 4): one, or a CUDA graph's quiet stretch
        log.add(stats)
        it = training.iteration = it + len(stats)
        if partners is not None:  # the swap moved the networks of a side, and their origins with them
            training.swaps.append(it)
            training.moved.update(side for side, now, then in zip('GD', (G, D), origins) if now['origin'] != then)

        logging = it % cfg['log_every'] == 0 or it == last
        stopping = procs.anyone(interrupted) if logging or procs.world == 1 else False  # all processes agree
        if logging:
            every_pair = log.unlogged(procs)  # under torchrun: every process's pairs
            recorder.stop_if_nonfinite(every_pair, it - log.n + 1)
            rate = speed.rate(it)
            recorder.say(format_log(it, log.close(it, every_pair), rate, (last - it) / max(rate or 1, 1e-9)))  # a line
        evaluate_now = evaluates_at(it, cfg)
        saving = it % cfg['sample_every'] == 0 or it == last or stopping
        if evaluate_now or saving:
            with speed.paused():
                unlogged = log.unlogged(procs)
                recorder.stop_if_nonfinite(unlogged, it - log.n + 1)
                collect_pairs(training, G, D, procs)  # under torchrun: every process's pairs to the one that writes
                if evaluate_now:  # before the checkpoint: a resume from an earlier one redoes it
                    recorder.evaluate(it)
                if saving:
                    recorder.save(it, unlogged)
        if stopping:
            recorder.say(f'interrupted: checkpoint saved after iteration {it}; continue with --resume=True')
            break
    recorder.losses()
    return stopping


# ====================================================================================
# Support code: the command line, the data, the written-out backward and its start-up check, files and
# checkpoints, the evaluation, comparing runs, pictures, torchrun's processes, the run, CUDA graphs.
# ====================================================================================

CLASSIFIER_VERSION = 1  # bump when Classifier or its training changes, so caches are rebuilt
CLASSIFIER_EPOCHS = {'mnist': 3, 'fashion_mnist': 6}
COLLECTIVE_TIMEOUT = 300  # seconds a process waits for the others before it gives up
# Every hyperparameter's rules, in one table that every check reads (a test fails when the block has a name
# that is not here; one added without a row takes its default's kind, is never resumable and separates
# configurations). kind: the value it takes, in the block or on the command line. Flags:
#   R  a resume may change it (the run continues exactly, only its schedule or its files change)
#   S  it fixes the networks' shape: a checkpoint fits only networks of its own
#   P  runs that differ in it cannot share one pool of discriminators in --compare
#   C  runs that differ in it are different configurations in --compare (the others' runs are seeds of one)
RULES = {
    'z_dim': (int, 'SPC'), 'h_dim': (int, 'SPC'), 'layers': (int, 'SPC'),
    'n_pairs': (int, 'SC'), 'K': (int, 'C'),
    'mb_size': (int, 'C'), 'lr': (float, 'RC'), 'beta1': (float, 'C'), 'iterations': (int, 'RC'), 'seed': (int, ''),
    'paper': (bool, 'C'), 'own_noise': (bool, 'C'), 'prior': (str, 'C'), 'input_noise': (float, 'C'),
    'clip': (float, 'C'), 'swap': (str, 'C'), 'batch_norm': (bool, 'SC'),
    'log_every': (int, 'R'), 'sample_every': (int, 'R'), 'out_dir': (str, 'R'), 'resume': (bool, 'R'), 'resume_edited': (bool, 'R'),
    'dataset': (str, 'SPC'), 'data_root': (str, 'R'), 'train_size': (int, 'C'),
    'eval_every': (int, 'R'), 'eval_at_end': (bool, 'R'), 'eval_samples': (int, 'R'), 'classifier_dir': (str, 'R'),
    'compare': (str, 'R'),
    'device': (str, 'R'), 'dtype': (str, 'SC'), 'cuda_graphs': (bool, 'R'), 'threads': (int, 'R'),
}
KINDS = {name: kind for name, (kind, _) in RULES.items()}
RESUMABLE = tuple(name for name, (_, flags) in RULES.items() if 'R' in flags)
SHAPE_KEYS = tuple(name for name, (_, flags) in RULES.items() if 'S' in flags)
POOL_KEYS = tuple(name for name, (_, flags) in RULES.items() if 'P' in flags)
NOT_CONFIGURATION = tuple(name for name, (_, flags) in RULES.items() if 'C' not in flags)
IMAGE_DATASETS = {'mnist': 'MNIST', 'fashion_mnist': 'FashionMNIST'}  # torchvision's class and folder names
MIXTURES = ('ring8', 'grid25', 'r15')
R15_CENTRE = (10.0, 9.96)  # where R15's own coordinates put the centre of the mixture that mixture('r15') centres
MNIST_FILES = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte',
               't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')  # the same four names for Fashion-MNIST

# ------------------------------------------------------------------------------------
# command line: --name=value, checked against the kind of value each name takes

def hyperparameters():
    """(name, default, meaning) of each assignment in the block above, read from this file so --help never drifts.

    Any plain `name = value` works there (an expression too), with or without a `# meaning` after it; blank and
    comment-only lines are skipped. Anything else is refused with its line number, as is a value of the wrong kind
    (KINDS: a string for a number, 2.5 for a count); a count written as a whole float (2e5) is an integer."""
    with open(__file__) as f:
        lines = f.read().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith('# --- hyperparameters')) + 1
    block = '\n'.join(lines[first:next(i for i, line in enumerate(lines) if line.startswith('# --- end of hyperparameters'))])
    comments = {token.start[0]: token.string.lstrip('#').strip()
                for token in tokenize.generate_tokens(StringIO(block).readline) if token.type == tokenize.COMMENT}
    table = []
    for node in ast.parse(block).body:
        where = f'{os.path.basename(__file__)} line {first + node.lineno}'
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            refuse(f'{where}: {ast.get_source_segment(block, node)!r} is not a hyperparameter; '
                   f'write one `name = value  # meaning` per line')
        name = node.targets[0].id
        if type(globals()[name]) not in (bool, int, float, str):
            refuse(f'{where}: {name} must be a number, True/False or a string, not {type(globals()[name]).__name__}')
        value = of_kind(KINDS.get(name, type(globals()[name])), globals()[name])
        if value is None:
            refuse(f'{where}: {name} must be {ACCEPTED[KINDS[name]]}, not {globals()[name]!r}')
        table.append((name, value, comments.get(node.end_lineno, '')))
    return table


ACCEPTED = {bool: 'True or False', int: 'a whole number', float: 'a number', str: 'a string'}


def of_kind(kind, value):
    """value as a value of kind, the one place that coerces: a count written as a whole float (2e5 in the block,
    1e3 on the command line) as an integer, a number written as an integer as a float; None when it is of another
    kind (a string for a number, 2.5 for a count, 1 for True)."""
    if kind is int and type(value) is float and value.is_integer():
        return int(value)
    if kind is float and type(value) is int:
        return float(value)
    return value if type(value) is kind else None


def refuse(message):
    """Bad input: one line on stderr and exit status 2, before any work starts."""
    print(f'parallel_gan.py: error: {message}', file=sys.stderr)
    sys.exit(2)


def convert(name, text, default):
    """The text of --name=text as a value of name's kind (KINDS, else the default's), or a refusal saying what is
    accepted. Numbers take the forms the block takes: 1000, 1_000, 1e3 (a count too, when it is whole)."""
    kind = KINDS.get(name, type(default))
    if kind is bool:
        value = {'true': True, '1': True, 'false': False, '0': False}.get(text.lower())
    elif kind is str:
        value = text
    else:
        try:
            number = int(text) if re.fullmatch(r'[-+]?\d[\d_]*', text) else float(text)
        except ValueError:
            number = None
        value = None if number is None else of_kind(kind, number)
    if value is None:
        refuse(f'--{name}={text}: expected {ACCEPTED[kind]} (default {default!r})')
    return value


def check(cfg):
    """Refuse values that make no sense, before any work starts."""
    rules = [
        (cfg['z_dim'] >= 1, 'z_dim must be at least 1'),
        (cfg['h_dim'] >= 1, 'h_dim must be at least 1'),
        (cfg['layers'] >= 1, 'layers must be at least 1'),
        (cfg['n_pairs'] >= 1, 'n_pairs must be at least 1'),
        (cfg['K'] >= 0, 'K must be 0 (never swap) or a positive number of iterations'),
        (cfg['K'] == 0 or cfg['n_pairs'] >= 2, 'K>0 swaps discriminators between pairs: it needs n_pairs >= 2 (or K=0)'),
        (cfg['mb_size'] >= 1, 'mb_size must be at least 1'),
        (cfg['mb_size'] >= 2 or not cfg['batch_norm'], 'batch_norm needs mb_size of at least 2 (one example has no '
                                                       'batch statistics to normalise by)'),
        (cfg['lr'] > 0 and math.isfinite(cfg['lr']), 'lr must be a positive number'),
        (0 <= cfg['beta1'] < 1, 'beta1 must be at least 0 and below 1'),
        (0 <= cfg['seed'] < 2 ** 32, 'seed must be a whole number from 0 to 2**32 - 1 (4294967295)'),
        (cfg['train_size'] >= 0, 'train_size must be 0 (all) or a positive number of examples'),
        (cfg['iterations'] >= 1, 'iterations must be at least 1'),
        (cfg['log_every'] >= 1, 'log_every must be at least 1'),
        (cfg['sample_every'] >= 1, 'sample_every must be at least 1'),
        (cfg['threads'] >= 0, 'threads must be 0 (torch default) or a positive count'),
        (cfg['dataset'] in (*IMAGE_DATASETS, *MIXTURES), f"dataset must be one of {', '.join((*IMAGE_DATASETS, *MIXTURES))}"),
        (cfg['eval_every'] >= 0, 'eval_every must be 0 (never) or a positive number of iterations'),
        (cfg['eval_samples'] >= 2, 'eval_samples must be at least 2'),
        (cfg['dtype'] in ('float32', 'float64'), "dtype must be 'float32' or 'float64'"),
        (cfg['prior'] in ('gaussian', 'uniform', 'mixed'), "prior must be 'gaussian', 'uniform' or 'mixed'"),
        (cfg['swap'] in ('derangement', 'matching'), "swap must be 'derangement' or 'matching'"),
        (cfg['input_noise'] >= 0 and math.isfinite(cfg['input_noise']), 'input_noise must be 0 (none) or a positive std'),
        (cfg['clip'] >= 0 and math.isfinite(cfg['clip']), 'clip must be 0 (never) or a positive gradient norm'),
        (re.fullmatch(r'auto|cpu|cuda(:\d+)?', cfg['device']) is not None,
         "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        (not cfg['device'].startswith('cuda') or torch.cuda.is_available(),
         f"device {cfg['device']!r} asked for, but CUDA is not available here (use --device=cpu or auto)"),
    ]
    for ok, message in rules:
        if not ok:
            refuse(message)


block_values = {}  # the block as the last parse_args read it: checkpoints keep it, so that a resume can tell its edits
explicit = set()  # the names the last parse_args was given explicitly: on its command line, and, on a resume, those
# edited in the block since the checkpoint's run; all others are the block's values (the checkpoint's, on a resume)


def parse_args(argv):
    """The hyperparameters: the defaults above, overridden by --name=value arguments; on a resume, the checkpoint's,
    overridden only by those given explicitly (continued). Sets block_values and explicit."""
    global block_values, explicit
    table = hyperparameters()
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
    lines += [f'  --{name:<15} {default!r:<18} {meaning}' for name, default, meaning in table]
    try:
        print('\n'.join(lines), flush=True)
    except BrokenPipeError:  # `--help | head`: the reader stopped early, which is no error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0)


def continued(cfg, named):
    """A resume's hyperparameters, and the names given explicitly: the checkpoint's values, but for the names on the
    command line (named) and those edited in the block since the checkpoint's run (it keeps the block as it was).
    out_dir is where the checkpoint was found. A checkpoint that is missing or damaged is left to load_checkpoint
    to refuse; one written before checkpoints kept the block leaves cfg as it is (a resume then compares with it)."""
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
    """MNIST or Fashion-MNIST as uint8 (N, 784) images and labels; one clear message and exit 1 when they cannot be had."""
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
    """Centres (modes, 2) and standard deviation of a 2-D Gaussian mixture, as the literature defines them: 8
    Gaussians on a circle of radius 2 with std 0.02; 25 on the grid {-4,-2,0,2,4}^2 with std 0.05; or R15
    (Veenman et al. 2002): one Gaussian at the centre, 7 at radius 2.025 and 7 at radius 6.4 around it, both rings
    at angles k*360/7, std 0.3, centred at the origin (in R15's own coordinates the centre is R15_CENTRE; networks
    with batch norm and clipped gradients did not reach data that far off, K=0 included). The generators of 2-D
    data have a linear output."""
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
    """Minibatches from a data tensor on the training device, a fresh shuffle each epoch.

    Every image is used once per epoch: a batch that runs past the end of an epoch
    takes the rest from the next shuffle, as the reference's reader did. No per-image
    Python work and no host-device synchronisation."""

    def __init__(self, data, mb_size, seed):
        self.data, self.mb_size = data, mb_size
        self.rng = torch.Generator(device=data.device).manual_seed(seed)
        self.order, self.pos = self.shuffle(), 0

    def shuffle(self):
        return torch.randperm(len(self.data), generator=self.rng, device=self.data.device)

    def next(self):
        parts, need = [], self.mb_size
        while need:
            if self.pos == len(self.order):
                self.order, self.pos = self.shuffle(), 0
            take = min(need, len(self.order) - self.pos)
            parts.append(self.order[self.pos:self.pos + take])
            self.pos, need = self.pos + take, need - take
        rows = parts[0] if len(parts) == 1 else torch.cat(parts)
        return self.data.index_select(0, rows)  # a plain row gather, several times faster than self.data[rows]

    def state_dict(self):
        return {'rng': self.rng.get_state(), 'order': self.order.cpu(), 'pos': self.pos}

    def load_state_dict(self, state):
        self.rng.set_state(state['rng'])
        self.order, self.pos = state['order'].to(self.data.device), state['pos']


class PairBatches:
    """Each pair's own minibatches (own_noise): one Batches per pair, each with its own shuffle; (n_pairs, batch, ...)."""

    def __init__(self, data, mb_size, seeds):
        self.data, self.each = data, [Batches(data, mb_size, seed) for seed in seeds]

    def next(self):
        return torch.stack([batches.next() for batches in self.each])

    def state_dict(self):
        return {'each': [batches.state_dict() for batches in self.each]}

    def load_state_dict(self, state):
        for batches, saved in zip(self.each, state['each']):
            batches.load_state_dict(saved)


def make_batches(data, cfg, seed):
    """One shuffle shared by every pair, or each pair its own (own_noise)."""
    if not cfg['own_noise']:
        return Batches(data, cfg['mb_size'], seed)
    return PairBatches(data, cfg['mb_size'], [seed + 1_000_003 * (k + 1) for k in range(cfg['n_pairs'])])


def as_inputs(batch, dtype):
    """A batch as network inputs: image pixels in PIXELS, 2-D points as they are. Images stay uint8 until a batch is
    drawn, which quarters their memory."""
    if batch.dtype != torch.uint8:
        return batch.to(dtype)
    low, high = PIXELS
    return batch.to(dtype) / 255 if (low, high) == (0.0, 1.0) else batch.to(dtype) * ((high - low) / 255) + low


def as_unit_pixels(samples):
    """Generated images as pixels in [0, 1], as the classifier and the pictures take them."""
    low, high = PIXELS
    return (samples - low) / (high - low)


# ------------------------------------------------------------------------------------
# the written-out backward: where the start-up check confirms it, it trains instead of autograd

class Adam(torch.optim.Adam):
    """torch's fused Adam without the generic Optimizer.step bookkeeping (hooks, profiler records,
    grad-scaler checks), which at this size costs about as much as the update itself. Same state,
    same update kernel: the tests pin it to torch.optim.Adam through the reference loop."""

    def __init__(self, params, lr, beta1):
        super().__init__(params, lr=lr, betas=(beta1, 0.999), fused=True)

    @torch.no_grad()  # for the weights that autograd trains
    def step(self):
        group = self.param_groups[0]
        params = group['params']
        if not self.state:
            return super().step()  # the first step creates the state
        states = [self.state[p] for p in params]
        steps = [state['step'] for state in states]
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(params, [p.grad for p in params], [state['exp_avg'] for state in states],
                           [state['exp_avg_sq'] for state in states], [], steps, amsgrad=False, lr=group['lr'],
                           beta1=group['betas'][0], beta2=group['betas'][1], weight_decay=group['weight_decay'],
                           eps=group['eps'], maximize=False)
    step.hooked = True  # tells Optimizer not to wrap step in its hook and profiler layer


# The gradients of the two losses above, written out: (D - 1) / batch on real logits, D / batch on fake ones
# for d_loss, (D - 1) / batch for g_loss. Autograd gives the same at about twice the cost of a step's small
# ops, so check_losses uses these only for a loss whose autograd gradient they match at start-up; an edited
# loss trains through autograd (loss_and_logit_grads).
CLOSED_FORMS = {
    'd_loss': lambda real, fake: ((torch.sigmoid(real) - 1) / real.shape[1], torch.sigmoid(fake) / fake.shape[1]),
    'g_loss': lambda fake: ((torch.sigmoid(fake) - 1) / fake.shape[1],),
}
verified_closed_forms = {}  # loss function -> its closed-form gradient, filled by check_losses


def check_losses():
    """Use the written-out gradient of each loss that autograd confirms on random float64 logits, big ones too."""
    rng = torch.Generator().manual_seed(0)
    verified_closed_forms.clear()
    for loss, n_inputs in ((d_loss, 2), (g_loss, 1)):
        logits = [4 * torch.randn(2, 6, 1, generator=rng, dtype=torch.float64) for _ in range(n_inputs)]
        closed_form = CLOSED_FORMS[loss.__name__](*logits)
        autograd = loss_and_logit_grads(loss, *logits)[1]
        if all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(closed_form, autograd)):
            verified_closed_forms[loss] = CLOSED_FORMS[loss.__name__]


def linear_backward(layer, x, y, grad, weights, need_input):
    if weights:
        torch.bmm(x.transpose(1, 2), grad, out=layer.weight.grad)
        torch.sum(grad, 1, keepdim=True, out=layer.bias.grad)
    return torch.bmm(grad, layer.weight.transpose(1, 2)) if need_input else None


# d(loss)/d(a layer's input) from d(loss)/d(its output), given its input x and output y, for the layers that have
# one written out (a handful of products: about 1.4x faster than autograd at this size). Activations use y only,
# so they may run in place. check_backward tries these against autograd at every start.
WRITTEN_OUT = {
    Linear: linear_backward,
    nn.ReLU: lambda layer, x, y, grad, *_: torch.ops.aten.threshold_backward(grad, y, 0),
    nn.LeakyReLU: lambda layer, x, y, grad, *_: torch.ops.aten.leaky_relu_backward(grad, y, layer.negative_slope, True),
    nn.Sigmoid: lambda layer, x, y, grad, *_: torch.ops.aten.sigmoid_backward(grad, y),
    nn.Tanh: lambda layer, x, y, grad, *_: torch.ops.aten.tanh_backward(grad, y),
}
written_out_confirmed = {}  # 'G' or 'D' -> True where check_backward confirmed the written-out backward


def forward_saving(model, x):
    """model's output on x, and every layer's input and output (what backward_written_out needs)."""
    outputs = [x.expand(model.n_pairs, *x.shape[-2:])]
    for layer in model:
        outputs.append(layer.forward(outputs[-1]))
    return outputs[-1], outputs


def backward_written_out(model, outputs, grad, weights=True, inputs=False):
    """Given d(loss)/d(output), write d(loss)/d(weight) into each weight's .grad (if weights) and return
    d(loss)/d(x) (if inputs), layer by layer from the output back."""
    layers = list(model)
    for k in range(len(layers) - 1, -1, -1):
        if k == 0 and not (inputs or weights):
            break
        grad = WRITTEN_OUT[type(layers[k])](layers[k], outputs[k], outputs[k + 1], grad, weights, k > 0 or inputs)
    return grad if inputs else None


def step_gradients(cfg, x_dim, written_out):
    """Both sides' gradients after one train_step of small float64 networks built the way this run builds its own
    (2 pairs, h_dim at most 6), G and D trained by their written-out backward where written_out says; the same
    weights, data and random draws (dropout's masks too) whatever written_out is."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        G, D = make_pairs({**cfg, 'h_dim': min(cfg['h_dim'], 6), 'n_pairs': 2}, x_dim, torch.device('cpu'),
                          torch.float64, n=2, written_out=written_out)
        z = torch.randn(2 if cfg['own_noise'] else 1, 4, cfg['z_dim'], dtype=torch.float64)
        low, high = PIXELS if cfg['dataset'] in IMAGE_DATASETS else (-1, 1)
        x = low + (high - low) * torch.rand(2 if cfg['own_noise'] else 1, 4, x_dim, dtype=torch.float64)
        input_noise = [0.1 * torch.randn(2, 4, x_dim, dtype=torch.float64) if cfg['input_noise'] else None
                       for _ in range(3)]
        torch.manual_seed(1)  # the draws of random layers
        train_step(G, D, z, x, input_noise, cfg['clip'])
    return {f'{name}.{p}': t.grad for name, side in (('G', G), ('D', D)) for p, t in side['model'].named_parameters()}


def check_backward(cfg, x_dim, say=print):
    """Decide which side trains by its written-out backward: a side whose every layer has one, and whose gradients,
    trained so, equal autograd's on small float64 copies of this run's networks (both steps, each side alone).
    Every other side trains through autograd, and one line says so. Refuses weights without a pairs dimension."""
    sides = dict(zip('GD', make_pairs({**cfg, 'h_dim': min(cfg['h_dim'], 6)}, x_dim, torch.device('cpu'),
                                      torch.float64, n=2, written_out={})))
    flat = [f'{name}.{k}' for name, side in sides.items()
            for k, t in (*side['model'].named_parameters(), *side['model'].named_buffers()) if t.shape[:1] != (2,)]
    if flat:
        refuse(f'{", ".join(flat)} has no leading pairs dimension: every weight of the networks is (n_pairs, ...); '
               f'use Linear, SpectralLinear (spectral norm per pair), BatchNorm, or PerPair(n, lambda: your_layer)')
    autograd = step_gradients(cfg, x_dim, {})
    written_out_confirmed.clear()
    for name, side in sides.items():
        model = side['model']
        missing = sorted({type(layer).__name__ for layer in model if type(layer) not in WRITTEN_OUT})
        if missing or not model.per_example:
            say(f'{name} trains through autograd ({", ".join(missing) or "batch statistics"} '
                f'{"has" if len(missing) < 2 else "have"} no written-out backward): roughly {AUTOGRAD_COST} the time '
                f'of its written-out step')
            continue
        trial = step_gradients(cfg, x_dim, {name: True})
        differ = [k for k in autograd if not torch.allclose(trial[k], autograd[k], rtol=1e-7, atol=1e-10)]
        if differ:
            say(f'{name} trains through autograd: its written-out backward differs from autograd\'s for '
                f'{", ".join(differ)} (mend WRITTEN_OUT for the layer you changed to get the fast step back)')
        else:
            written_out_confirmed[name] = True


AUTOGRAD_COST = '1.3x'  # one side through autograd: the LayerNorm-in-D edit runs at 0.78x the default's speed (CPU)


@contextmanager
def evaluating(*sides):
    """The sides' networks in eval mode (dropout off, batch norm's running statistics), then back to training."""
    for side in sides:
        side['model'].eval()
    try:
        yield
    finally:
        for side in sides:
            side['model'].train()


@torch.no_grad()
def generate(G, z):
    """Each generator's samples of the noise z, (n_pairs, batch, x_dim), in eval mode."""
    with evaluating(G):
        return G['model'](z)


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


def checkpoint_path(cfg):
    return os.path.join(cfg['out_dir'], 'checkpoint.pt')


def save_checkpoint(path, state):
    with replacing(path) as tmp, open(tmp, 'wb') as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def side_state(side):
    """What a checkpoint keeps of a side: its networks' weights, their layers as text, and their Adam state."""
    return {'model': side['model'].state_dict(), 'layers': repr(side['model']), 'solver': side['solver'].state_dict()}


def first_weight(side):
    """A side's first weight: its device and dtype are the side's."""
    return next(side['model'].parameters())


def load_networks(side, saved_side, where, name):
    """Load a side's networks from a checkpoint's, or refuse in one line when the script builds other networks than
    those the checkpoint holds (an edited network, other hyperparameters): other layers, or weights of other names
    or shapes."""
    layers = [line.strip() for line in repr(side['model']).splitlines()]
    then = [line.strip() for line in saved_side.get('layers', repr(side['model'])).splitlines()]  # older: unrecorded
    if then != layers:
        there, here = next((a, b) for a, b in zip(then + [''], layers + ['']) if a != b)
        refuse(f'{where} holds other networks than this script builds ({name}: {there or "nothing"} there, '
               f'{here or "nothing"} here)')
    saved, mine = saved_side['model'], side['model'].state_dict()
    differ = [f'{name}.{k} {tuple(saved[k].shape) if k in saved else "absent"} there, '
              f'{tuple(mine[k].shape) if k in mine else "absent"} here'
              for k in sorted(set(mine) | set(saved)) if k not in mine or k not in saved or mine[k].shape != saved[k].shape]
    if differ:
        refuse(f'{where} holds other networks than this script builds ({"; ".join(differ[:3])}'
               f'{"; ..." if len(differ) > 3 else ""})')
    side['model'].load_state_dict(saved)


def algorithm_code():
    """{name: crc32 of its source} of every definition in the algorithm part of this file (from the end of the
    hyperparameter block to the support part's divider): the networks, losses, step, swap and loop that train,
    read as Python's parser reads them, so a docstring, comment or layout changes nothing. Checkpoints keep it,
    so that a resume and --compare can tell a run trained by other code."""
    with open(__file__) as f:
        source = f.read()
    top = source[source.index('\n', source.index('# --- end of hyperparameters')):source.index('\n# ====')]
    code = {}
    for node in ast.parse(top).body:
        targets = [e for t in getattr(node, 'targets', []) for e in getattr(t, 'elts', [t])]  # a, b = ...: both
        names = [node.name] if hasattr(node, 'name') else [t.id for t in targets if hasattr(t, 'id')]
        for inner in ast.walk(node):  # what it does, not how it is worded: docstrings and comments aside
            body = getattr(inner, 'body', None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(
                    getattr(body[0], 'value', None), ast.Constant) and isinstance(body[0].value.value, str):
                inner.body = body[1:] or [ast.Pass()]
        for name in names:
            code[name] = zlib.crc32(ast.dump(node).encode())
    return code


def code_differences(then, now):
    """'d_loss changed; hinge added' between two algorithm_code()s; '' where they agree or then is unknown."""
    if then is None:
        return ''
    words = [(sorted(k for k in now if k in then and now[k] != then[k]), 'changed'),
             (sorted(k for k in now if k not in then), 'added'), (sorted(k for k in then if k not in now), 'removed')]
    return '; '.join(f'{", ".join(names)} {word}' for names, word in words if names)


def load_checkpoint(path, cfg, dev):
    """The checkpoint's state, or a clear refusal when it is missing, damaged, of other networks, or asked to go
    on with hyperparameters that would not continue it exactly (all but RESUMABLE)."""
    if not os.path.exists(path):
        refuse(f'--resume=True but there is no checkpoint at {path}')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)  # loading into the networks moves it
        saved = {name: default for name, default, _ in hyperparameters()} | state['hyperparameters']
        state['iteration'], state['G'], state['D'], state['pairing']  # everything a resume needs is there
    except Exception as error:
        refuse(f'cannot resume: {path} is damaged or not a checkpoint of this script ({type(error).__name__})')
    changed = lambda keys: '; '.join(f'{k}={saved[k]!r} there, {cfg[k]!r} now' for k in keys if saved[k] != cfg[k])
    if changed(SHAPE_KEYS):
        refuse(f'cannot resume from {path}: it holds other networks ({changed(SHAPE_KEYS)})')
    if changed(k for k in cfg if k not in RESUMABLE):
        refuse(f'cannot resume from {path} with other settings, which would not continue it exactly '
               f'({changed(k for k in cfg if k not in RESUMABLE)}); a resume may change only {", ".join(RESUMABLE)}')
    written_on = state.get('device', 'cpu')
    if written_on != dev.type:  # a CPU and a CUDA random stream cannot take each other's state
        refuse(f'cannot resume from {path} on the {dev.type}: it was written on the {written_on}, and its noise '
               f'and data order continue exactly only there (--device={written_on})')
    return state


# ------------------------------------------------------------------------------------
# evaluation: does each generator cover the data's modes, and how good are its samples?

class Classifier(nn.Module):
    """A small convolutional digit classifier; its 128-unit penultimate layer gives the features
    for the Frechet distance."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        """(class logits, features) for (batch, 784) pixels in [0, 1]."""
        features = self.features(x)
        return self.head(features), features


def fit_classifier(images, labels, epochs, dev, batch_size=128, seed=0):
    """Train a Classifier on uint8 (N, 784) images with Adam."""
    torch.manual_seed(seed)
    model = Classifier().to(dev)
    solver = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, labels = images.to(dev), labels.to(dev).long()
    for _ in range(epochs):
        for batch in torch.randperm(len(images), device=dev).split(batch_size):
            loss = F.cross_entropy(model(images[batch].float() / 255)[0], labels[batch])
            solver.zero_grad()
            loss.backward()
            solver.step()
    return model.eval()


@torch.no_grad()
def classify(model, pixels, chunk=500):
    """Class probabilities and features of (N, 784) pixels in [0, 1]."""
    outputs = [model(part.float()) for part in pixels.split(chunk)]
    return torch.cat([o[0] for o in outputs]).softmax(1), torch.cat([o[1] for o in outputs])


def load_classifier(cfg, dev, images, labels):
    """The classifier for cfg's image dataset (training images and labels given): from the cache when it was
    trained on the same data, else trained now (and cached when the folder is writable). Prints its test-set
    accuracy; returns it and the test set's feature statistics."""
    test_images, test_labels = load_images(cfg['dataset'], cfg['data_root'], train=False)
    fingerprint = [CLASSIFIER_VERSION, *(zlib.crc32(t.contiguous().numpy()) for t in (images, labels, test_images))]
    path = os.path.join(cfg['classifier_dir'], f'{cfg["dataset"]}.pt')
    model = Classifier().to(dev)
    try:
        cached = torch.load(path, map_location=dev, weights_only=True)
        if cached['fingerprint'] != fingerprint:
            raise ValueError('trained on other data')
        model.load_state_dict(cached['model'])
        model.eval()
        how = f'cached in {path}'
    except Exception:
        print(f'training the classifier that scores samples ({CLASSIFIER_EPOCHS[cfg["dataset"]]} epochs on {len(images)} '
              f'images: about a minute on 2 CPU cores, seconds on a GPU; once, then cached in {path})', flush=True)
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
    features = features.double()
    return features.mean(0), torch.cov(features.T)


def frechet_distance(stats_a, stats_b):
    """|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), with Tr (S_a S_b)^(1/2) from the eigenvalues
    of S_a^(1/2) S_b S_a^(1/2) (symmetric, so no general matrix square root is needed)."""
    (mu_a, cov_a), (mu_b, cov_b) = stats_a, stats_b
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item()


def coverage(counts, n_samples):
    """Modes covered (at least a third of their fair share of the samples) and KL(histogram || uniform)."""
    modes = len(counts)
    covered = int((counts >= n_samples / (3 * modes)).sum())
    share = counts.double() / max(float(counts.sum()), 1.0)
    nonzero = share[share > 0]
    kl = float((nonzero * (nonzero * modes).log()).sum()) if len(nonzero) else float('nan')
    return covered, kl


def image_metrics(probs, features, test_stats):
    """Class histogram, modes covered, KL to uniform, classifier score, confidence and Frechet distance."""
    counts = torch.bincount(probs.argmax(1), minlength=10).cpu()
    covered, kl = coverage(counts, len(probs))
    marginal = probs.mean(0, keepdim=True)
    score = torch.exp((probs * (probs.clamp_min(1e-12).log() - marginal.log())).sum(1).mean()).item()
    return {'modes': covered, 'modes_captured': float('nan'), 'kl': kl, 'score': score,
            'confidence': probs.max(1).values.mean().item(),
            'fd': frechet_distance(feature_stats(features), test_stats), 'high_quality': float('nan'),
            'histogram': (counts.double() / len(probs)).tolist()}


def mixture_metrics(points, dataset, real_stats):
    """For 2-D samples, the literature's two numbers: the share of "high quality" samples (within 3 standard
    deviations of their nearest mode) and the modes captured (the nearest mode of at least one high-quality
    sample); and ours: modes covered (at least a third of their fair share of the samples, high-quality ones),
    KL of the high-quality histogram to uniform, and the Frechet distance of the points to the real mixture."""
    centres, std = mixture(dataset)
    distance, nearest = torch.cdist(points.double().cpu(), centres.double()).min(1)
    close = distance <= 3 * std
    counts = torch.bincount(nearest[close], minlength=len(centres))
    covered, kl = coverage(counts, len(points))
    return {'modes': covered, 'modes_captured': int((counts > 0).sum()), 'kl': kl, 'score': float('nan'),
            'confidence': float('nan'), 'fd': frechet_distance(feature_stats(points.cpu()), real_stats),
            'high_quality': close.double().mean().item(), 'histogram': (counts.double() / len(points)).tolist()}


@torch.no_grad()
def cross_scores(D, samples):
    """The paper's cross-scoring (GAM-II style): scores[d, g] = mean D_d(G_g(z)), every discriminator's mean
    output on every generator's samples; rows follow the discriminators' slots."""
    with evaluating(D):
        return torch.stack([torch.sigmoid(D['model'](s)).mean((1, 2)) for s in samples], 1).double().cpu()


@torch.no_grad()
def judge_real(D, points, chunk=1000):
    """Each discriminator's mean D(x) and its accuracy (the share it takes for real, D > 0.5) on real points
    (N, x_dim): two (n_pairs,) tensors, in slot order."""
    with evaluating(D):
        prob = torch.cat([torch.sigmoid(D['model'](part)) for part in points.split(chunk)], 1)
    return prob.mean((1, 2)).double().cpu(), (prob > 0.5).double().mean((1, 2)).cpu()


def held_out_data(cfg, n):
    """n examples the networks never train on: the test split's first n images, or fresh draws of the mixture."""
    if cfg['dataset'] in MIXTURES:
        return sample_mixture(cfg['dataset'], n, seed=777)[0]
    return load_images(cfg['dataset'], cfg['data_root'], train=False)[0][:n]


class Evaluator:
    """Scores every generator on eval_samples samples: coverage, quality and the discriminator pool's verdict;
    and every discriminator on real training and held-out examples (does it generalise or memorise?)."""

    def __init__(self, cfg, dev, dtype, train_data, train_labels):
        self.cfg, self.dev, self.dtype = cfg, dev, dtype
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

    def __call__(self, G, D, it):
        """One row per generator (in the order of the pairs they started in): its metrics, its mean and worst score
        over the pool of discriminators, and how the discriminator that started in its pair judges real training
        and held-out examples."""
        rng = torch.Generator(device=self.dev).manual_seed(self.cfg['seed'] * 1_000_003 + it + 7)  # training RNGs untouched
        chunks, samples = [], []
        for n in torch.arange(self.cfg['eval_samples']).split(1000):
            fake = generate(G, to_slots(draw_noise(self.cfg, len(n), rng, self.dtype), G))
            chunks.append(cross_scores(D, fake) * len(n))
            samples.append(fake)
        by_slot = sum(chunks) / self.cfg['eval_samples']
        scores = torch.empty_like(by_slot)
        scores[torch.tensor(D['origin'])[:, None], torch.tensor(G['origin'])] = by_slot  # [d, g]: by starting pairs
        judged = {}
        for split, points in self.real.items():
            for key, in_slots in zip(('', '_acc'), judge_real(D, points)):
                judged[f'd_{split}{key}'] = torch.empty_like(in_slots)
                judged[f'd_{split}{key}'][D['origin']] = in_slots  # by starting pair, as the scores
        rows = []
        for g in range(len(G['origin'])):
            slot = G['origin'].index(g)
            metrics = self.generator_metrics(torch.cat([s[slot] for s in samples]))
            d = {key: value[g].item() for key, value in judged.items()}
            rows.append({'iteration': it, 'generator': g + 1, **metrics, 'pool_mean': scores[:, g].mean().item(),
                         'pool_worst': scores[:, g].min().item(), **d, 'd_gap': d['d_train'] - d['d_heldout'],
                         'd_acc_gap': d['d_train_acc'] - d['d_heldout_acc'], 'd_scores': scores[:, g].tolist()})
        return rows


METRIC_COLUMNS = ('iteration', 'generator', 'modes', 'modes_captured', 'kl', 'score', 'confidence', 'fd', 'high_quality',
                  'pool_mean', 'pool_worst', 'd_train', 'd_heldout', 'd_gap', 'd_train_acc', 'd_heldout_acc',
                  'd_acc_gap', 'histogram', 'd_scores')


def write_metrics(path, rows, keep_until):
    """Write metrics.csv: its rows up to iteration keep_until (a resumed run redoes later ones), then rows
    (lists as space-separated numbers); the whole file each time, so it is never half-written."""
    old = []
    if os.path.exists(path):
        with open(path) as f:
            old = [row for row in csv.DictReader(f) if int(row['iteration']) <= keep_until]
    with replacing(path) as tmp, open(tmp, 'w', newline='') as f:
        writer = csv.DictWriter(f, METRIC_COLUMNS)
        writer.writeheader()
        writer.writerows(old)
        for row in rows:
            writer.writerow({k: ' '.join(f'{v:.4g}' for v in row[k]) if isinstance(row[k], list)
                             else f'{row[k]:.6g}' if isinstance(row[k], float) else row[k] for k in METRIC_COLUMNS})


def read_metrics(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def format_eval(rows, n_modes):
    """One compact log line for an evaluation: per generator (G1/G2/...), then per discriminator (D1/D2/...)."""
    join = lambda key, fmt: '/'.join(format(row[key], fmt) for row in rows)
    images = math.isfinite(rows[0]['score'])
    quality = f'score {join("score", ".2f")}' if images else f'captured {join("modes_captured", "d")} | high quality {join("high_quality", ".2f")}'
    return (f'eval {rows[0]["iteration"]:>5} | modes {join("modes", "d")} of {n_modes} | {quality} | KL {join("kl", ".3f")} | '
            f'FD {join("fd", ".3g")} | D-pool mean {join("pool_mean", ".2f")} worst {join("pool_worst", ".2f")} | '
            f'D(x) train {join("d_train", ".2f")} held-out {join("d_heldout", ".2f")}')


# ------------------------------------------------------------------------------------
# comparing runs: every generator judged by one pool of discriminators from every run (the paper's GAM-II)



def find_runs(folder):
    """(name, checkpoint) of every checkpoint.pt in or below folder, hyperparameters completed with today's defaults;
    a damaged one is skipped with a warning; refused when none is left or the runs cannot share a pool."""
    paths = sorted(glob.glob(os.path.join(folder, '**', 'checkpoint.pt'), recursive=True))
    if not paths:
        refuse(f'--compare={folder}: no checkpoint.pt in or below it' + ('' if os.path.isdir(folder) else ' (no such folder)'))
    defaults = {name: default for name, default, _ in hyperparameters()}
    runs, damaged = [], []
    for path in paths:
        try:
            state = torch.load(path, map_location='cpu', weights_only=True)
            state['hyperparameters'] = {**defaults, **state['hyperparameters']}
            state['G']['model'], state['D']['model'], state['pairing']
        except Exception as error:
            damaged.append(f'{path} ({type(error).__name__})')
            continue
        runs.append((os.path.relpath(os.path.dirname(path), folder), state))
    if not runs:
        refuse(f'--compare={folder}: none of its {len(paths)} checkpoint(s) could be read: {", ".join(damaged)}')
    for path in damaged:
        print(f'parallel_gan.py: warning: skipping {path}: damaged or not a checkpoint of this script', file=sys.stderr)
    differ = []
    for key in POOL_KEYS:
        values = sorted({repr(state['hyperparameters'][key]) for _, state in runs})
        if len(values) > 1:
            differ.append(f'{key} ({" vs ".join(values)})')
    if differ:
        refuse(f'--compare={folder}: these runs cannot share a pool of discriminators, they differ in {", ".join(differ)}')
    return runs


def configurations(runs):
    """Each run's configuration: the hyperparameters that differ between the runs, seeds and output settings aside."""
    keys = [k for k in runs[0][1]['hyperparameters'] if k not in NOT_CONFIGURATION
            and len({repr(state['hyperparameters'][k]) for _, state in runs}) > 1]
    configs = [' '.join(f'{k}={state["hyperparameters"][k]}' for k in keys) for _, state in runs]
    codes = [state.get('code') for _, state in runs]
    versions = list(dict.fromkeys(repr(sorted(code.items())) if code else 'unknown' for code in codes))
    if len(versions) > 1:  # runs trained by different code are different configurations, whatever their settings
        print(f'these runs were trained by {len(versions)} versions of the code; each is its own configuration '
              f'(code=1 to {len(versions)}): {code_differences(codes[0], next(c for c in codes if c != codes[0]) or {})}')
        configs = [f'{c} code={versions.index(repr(sorted(code.items())) if code else "unknown") + 1}'.strip()
                   for c, code in zip(configs, codes)]
    return [c or 'all runs' for c in configs]


def restore_pairs(state, dev, where):
    """A run's generators and discriminators from its checkpoint, each side with its origin (which pair each slot's
    network started in)."""
    hp = state['hyperparameters']
    G, D = make_pairs(hp, data_dim(hp['dataset']), dev, getattr(torch, hp['dtype']))
    load_networks(G, state['G'], where, 'G')
    load_networks(D, state['D'], where, 'D')
    G['origin'], D['origin'] = list(state.get('generators', G['origin'])), list(state['pairing'])
    return G, D


@torch.no_grad()
def pool_errors(pairs, noises, chunk=1000):
    """errors[d, g]: the share of generator g's samples (of its run's noise) that discriminator d takes for real,
    D > 0.5, over every discriminator and every generator of every run, in run order."""
    Ds = [D for _, D in pairs]
    columns = []
    for (G, _), z in zip(pairs, noises):
        fooled = 0
        for part in z.split(chunk, dim=1):
            fake = generate(G, part)  # (generators, chunk, x_dim)
            with evaluating(*Ds):
                fooled = fooled + torch.stack([torch.cat([(torch.sigmoid(D['model'](sample.to(first_weight(D)))) > 0.5)
                                                          .sum((1, 2)) for D in Ds]) for sample in fake], 1)
        columns.append(fooled)
    return torch.cat(columns, 1).double().cpu() / noises[0].shape[1]


def compare_runs(cfg):
    """--compare=folder: score every generator of every run with the pool of every run's discriminators (GAM-II);
    print the table by configuration and write compare.csv, compare_matrix.csv and compare.png in the folder."""
    folder, dev = cfg['compare'], pick_device(cfg['device'])
    if cfg['threads']:
        torch.set_num_threads(cfg['threads'])
    runs = find_runs(folder)
    configs = configurations(runs)
    pairs = [restore_pairs(state, dev, os.path.join(folder, name, 'checkpoint.pt')) for name, state in runs]
    run_of = torch.tensor([r for r, (G, _) in enumerate(pairs) for _ in G['origin']])  # each slot's run
    hp = runs[0][1]['hyperparameters']
    print(f'comparing {len(runs)} runs ({len(run_of)} generators, as many discriminators) '
          f'on {cfg["eval_samples"]} samples per generator', flush=True)
    noises = [to_slots(draw_noise(state['hyperparameters'], cfg['eval_samples'], torch.Generator().manual_seed(cfg['seed']),
                                  first_weight(G).dtype), G).to(dev) for (_, state), (G, _) in zip(runs, pairs)]  # each G's own
    errors = pool_errors(pairs, noises)
    real = held_out_data(hp, cfg['eval_samples'])
    real_error = torch.cat([1 - judge_real(D, as_inputs(real.to(dev), first_weight(D).dtype))[1] for _, D in pairs])
    names = [(f'{runs[r][0]}:G{g + 1}', f'{runs[r][0]}:D{d + 1}')  # slot by slot: the networks each holds
             for r, (G, D) in enumerate(pairs) for g, d in zip(G['origin'], D['origin'])]
    table = compare_table(errors, real_error, run_of, configs)
    write_comparison(folder, errors, names, run_of, configs, table)
    write_per_generator(os.path.join(folder, 'compare_generators.csv'), errors, real_error, names, run_of)
    best_of_runs(cfg, hp, errors, run_of, [G for G, _ in pairs], noises, names, configs)
    return 0


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
    print('the best generator of each run (by the pool): its error rate over the other runs\' discriminators, '
          'and its own metrics\n| configuration | runs | ' + ' | '.join(keys) + ' |\n' + '|---' * (2 + len(keys)) + '|')
    for config in dict.fromkeys(configs):
        mine = torch.tensor([[row[k] for k in keys] for row in rows if row['configuration'] == config], dtype=torch.float64)
        spread = mine.std(0) if len(mine) > 1 else torch.zeros(len(keys))
        print(f'| {config} | {len(mine)} | ' + ' | '.join(f'{m:.3f} ± {s:.3f}' for m, s in zip(mine.mean(0), spread)) + ' |')
    with open(os.path.join(cfg['compare'], 'compare_best.csv'), 'w', newline='') as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows([{k: f'{v:.6g}' if isinstance(v, float) else v for k, v in row.items()} for row in rows])
    print(f'wrote {cfg["compare"]}/compare_best.csv')


def compare_table(errors, real_error, run_of, configs):
    """Per configuration, mean and std over its runs of the run averages: generators' mean and worst (lowest)
    error rate over the whole pool and over other runs' discriminators; discriminators' error on fakes and real."""
    per_run = []
    for r in range(len(configs)):
        mine, others = run_of == r, run_of != r
        g = errors[:, mine]
        per_run.append({'g_mean': g.mean(0), 'g_worst': g.min(0).values,
                        'g_mean_others': g[others].mean(0) if others.any() else torch.full((int(mine.sum()),), math.nan),
                        'g_worst_others': g[others].min(0).values if others.any() else torch.full((int(mine.sum()),), math.nan),
                        'd_fake_error': errors[mine].mean(1), 'd_real_error': real_error[mine]})
    table = []
    for config in dict.fromkeys(configs):
        members = [run for run, c in zip(per_run, configs) if c == config]
        row = {'configuration': config, 'runs': len(members)}
        for key in per_run[0]:
            values = torch.tensor([run[key].mean().item() for run in members], dtype=torch.float64)
            row[key], row[f'{key}_std'] = values.mean().item(), (values.std().item() if len(values) > 1 else 0.0)
        table.append(row)
    return table


def write_per_generator(path, errors, real_error, names, run_of):
    """compare_generators.csv: a row per generator, its error rate over the whole pool and over other runs'
    discriminators, and how the discriminator that started in its pair judges every generator's samples (its mean
    error on fakes) and held-out real data (the share it takes for fake): the raw numbers of compare.csv."""
    started_in = {d: slot for slot, (_, d) in enumerate(names)}  # 'run:Dk' -> its row (slot) in errors
    with replacing(path) as tmp, open(tmp, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['run', 'generator', 'pool_error', 'pool_error_others', 'd_fake_error', 'd_real_error'])
        for g, (name, _) in enumerate(names):
            run, k = name.rsplit(':G', 1)
            others = run_of != run_of[g]
            d = started_in[f'{run}:D{k}']
            writer.writerow([run, k, *(f'{v:.6g}' for v in (
                errors[:, g].mean().item(), errors[others, g].mean().item() if others.any() else math.nan,
                errors[d].mean().item(), real_error[d].item()))])


def write_comparison(folder, errors, names, run_of, configs, table):
    """Print the table; write it to compare.csv, the whole matrix to compare_matrix.csv, its heatmap to compare.png."""
    keys = ('g_mean', 'g_worst', 'g_mean_others', 'g_worst_others', 'd_fake_error', 'd_real_error')
    print('error rate = share of samples a discriminator takes for real (fakes) or for fake (real test data);\n'
          'generators: mean and worst (lowest) over the pool, and over other runs\' discriminators only')
    print('| configuration | runs | ' + ' | '.join(keys) + ' |\n' + '|---' * (2 + len(keys)) + '|')
    for row in table:
        print(f'| {row["configuration"]} | {row["runs"]} | '
              + ' | '.join(f'{row[k]:.3f} ± {row[k + "_std"]:.3f}' for k in keys) + ' |')
    with open(os.path.join(folder, 'compare.csv'), 'w', newline='') as f:
        writer = csv.DictWriter(f, ['configuration', 'runs', *(k + s for k in keys for s in ('', '_std'))])
        writer.writeheader()
        writer.writerows([{k: f'{v:.6g}' if isinstance(v, float) else v for k, v in row.items()} for row in table])
    with open(os.path.join(folder, 'compare_matrix.csv'), 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['discriminator \\ generator', *(g for g, _ in names)])
        writer.writerows([d, *(f'{v:.4g}' for v in row.tolist())] for (_, d), row in zip(names, errors))
    save_comparison_plot(os.path.join(folder, 'compare.png'), errors, [configs[int(r)] for r in run_of])
    print(f'wrote {folder}/compare.csv, compare_matrix.csv and compare.png')


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


def save_losses(path, history, n_pairs, swaps, moved='D', most=2000, long=200):
    """Each pair's D and G loss over the run (means over each log interval), with the swaps (iterations) of the sides
    that moved ('D', 'G' or both) marked; pair i is slot i, where the side that does not move stays. A long run
    stays readable: at most `most` points a curve (means of consecutive log lines); beyond `long` points, drawn
    thin and faint under a moving median per pair, with the y range set by the bulk of the points (the rarest
    0.5% at either end may fall outside it, and the axis says how many do); iterations written as 200k, 1M."""
    plt = pyplot()
    from matplotlib.ticker import EngFormatter
    if len(history) == 0:
        return
    faint = 'every log line' if len(history) <= most else f'means of {len(history) / most:.3g} log lines'
    if len(history) > most:  # consecutive rows averaged into `most` bins
        bins = torch.arange(len(history)) * most // len(history)
        history = torch.zeros(most, history.shape[1], dtype=history.dtype).index_add_(0, bins, history) \
            / torch.bincount(bins, minlength=most)[:, None]
    its = history[:, 0].numpy()
    stats = history[:, 1:].reshape(len(history), n_pairs, 4)
    smooth = len(history) > long
    window = max(len(history) // 50, 2)
    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for ax, column, name in ((axes[0], 0, 'D_loss'), (axes[1], 1, 'G_loss')):
        for i in range(n_pairs):
            values = stats[:, i, column]
            ax.plot(its, values.numpy(), color=f'C{i}', lw=0.5 if smooth else 1, alpha=0.35 if smooth else 1,
                    label=None if smooth else f'pair {i + 1}')
            if smooth:  # a centred moving median over `window` points: a lone spike does not move it
                medians = values.unfold(0, window, 1).median(1).values
                ax.plot(its[window // 2:window // 2 + len(medians)], medians.numpy(), color=f'C{i}', lw=1.6,
                        label=f'pair {i + 1}')
        off = 0
        if smooth:
            every = stats[:, :, column].flatten()
            low, high = torch.quantile(every, torch.tensor([0.005, 0.995], dtype=every.dtype)).tolist()
            low, high = low - 0.1 * (high - low + 1e-9), high + 0.1 * (high - low + 1e-9)
            ax.set_ylim(low, high)
            off = int(((every < low) | (every > high)).sum())
        if len(swaps) <= 100:
            ax.vlines(swaps, 0, 1, transform=ax.get_xaxis_transform(), colors='grey', alpha=0.3, lw=0.8)
        ax.set_ylabel(name + (f' ({off} off the scale)' if off else ''))
        ax.legend(loc='upper right', fontsize=8)
    axes[1].set_xlabel('iteration' + (f' (faint: {faint}; bold: their moving median over {window})' if smooth else ''))
    axes[1].xaxis.set_major_formatter(EngFormatter(sep=''))
    axes[0].set_title(swaps_title(swaps, moved))
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
# GAP across processes: under `torchrun --nproc_per_node=P`, process r trains pairs r*L .. r*L+L-1
# (L = n_pairs / P). Every process draws the same noise and batches as a single process would,
# and at each swap the discriminators move between processes by the same pairing. This class and
# copy_side are the only distributed code; in a single process they do nothing.

class Processes:
    """The processes of a torchrun launch, or just this one."""

    def __init__(self, cfg):
        self.world = int(os.environ.get('WORLD_SIZE', 1))
        self.rank = int(os.environ.get('RANK', 0))
        self.leader = self.rank == 0  # the only process that writes
        self.device = pick_device(cfg['device'])
        cuda = self.device.type == 'cuda'
        if self.world > 1:
            if cfg['n_pairs'] % self.world:
                refuse(f'n_pairs={cfg["n_pairs"]} cannot be spread evenly over {self.world} processes')
            import datetime
            import torch.distributed as dist
            self.dist = dist
            if cuda:
                self.device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
                torch.cuda.set_device(self.device)
            dist.init_process_group('nccl' if cuda else 'gloo', timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT))
        mine = cfg['n_pairs'] // self.world
        self.slots = torch.arange(self.rank * mine, (self.rank + 1) * mine)

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


def copy_side(source, target, per_pair):
    """Load target (a side: model and solver) with source's weights and Adam state, passing each
    per-pair tensor through per_pair: slicing out this process's pairs, or gathering every process's."""
    target['model'].load_state_dict({k: per_pair(v) for k, v in source['model'].state_dict().items()})
    solver = source['solver'].state_dict()
    solver['state'] = {i: {k: v if k == 'step' else per_pair(v) for k, v in s.items()} for i, s in solver['state'].items()}
    target['solver'].load_state_dict(solver)
    target['origin'] = list(source['origin'])  # every pair's


def share_of_process(training, cfg, procs):
    """(G, D): the pairs this process trains. In one process all of training's pairs; under torchrun copies of
    its slots' slices, which collect_pairs gathers back. Every side takes today's --lr (a resume may change it)."""
    G, D = training.G, training.D
    if procs.world > 1:
        G, D = make_pairs(cfg, data_dim(cfg['dataset']), procs.device, first_weight(G).dtype, n=len(procs.slots))
        mine = lambda t: t[procs.slots.to(t.device)]
        copy_side(training.G, G, mine)
        copy_side(training.D, D, mine)
    for side in (G, D, training.G, training.D):
        for group in side['solver'].param_groups:
            group['lr'] = cfg['lr']
    return G, D


def collect_pairs(training, G, D, procs):
    """Bring training's G and D (every pair) up to date from every process's share (all processes must call it)."""
    if procs.world > 1:
        copy_side(G, training.G, procs.gather)
        copy_side(D, training.D, procs.gather)

# ------------------------------------------------------------------------------------
# the run

def pick_device(name):
    return torch.device('cuda' if name == 'auto' and torch.cuda.is_available() else 'cpu' if name == 'auto' else name)


def format_log(it, stats, rate, left):
    """One line: the iteration, then per pair (G1/G2/...) D_loss, G_loss, mean D(x), mean D(G(z)); the speed
    since the previous line (none on a run's first line, which times a single warm-up iteration)."""
    join = lambda column, fmt: '/'.join(format(v, fmt) for v in stats[:, column].tolist())
    eta = f'{int(left // 3600)}h{int(left % 3600 // 60):02d}m' if left >= 3600 else f'{int(left // 60)}m{int(left % 60):02d}s'
    speed = 'first iteration' if rate is None else f'{rate:.0f} it/s, {eta} left'
    return (f'it {it:>7} | D_loss {join(0, ".3f")} | G_loss {join(1, ".3f")} | '
            f'D(x) {join(2, ".2f")} | D(G(z)) {join(3, ".2f")} | {speed}')


def first_nonfinite(recent, first_it):
    """(iteration, pair) of the first non-finite loss in the recorded stats, or None."""
    bad = (~torch.isfinite(recent[:, :, :2])).any(2).nonzero()
    return None if len(bad) == 0 else (first_it + int(bad[0, 0]), int(bad[0, 1]) + 1)


def nonfinite_sides(sides):
    """Which of the sides ({'G': side, 'D': side}) hold a non-finite weight: one reduction per weight tensor."""
    return [name for name, side in sides.items()
            if not torch.stack([p.isfinite().all() for p in side['model'].parameters()]).all()]


class LossLog:
    """Each pair's step statistics (D_loss, G_loss, mean D(x), mean D(G(z))) since the last log line, and one
    row of means per log line so far: what a resumed run needs to log exactly as the uninterrupted one."""

    def __init__(self, log_every, n_pairs, slots, dev, dtype):
        self.slots = slots  # this process's pairs
        self.recent = torch.zeros(log_every, len(slots), 4, device=dev, dtype=dtype)
        self.n = 0
        self.history = torch.zeros(0, 1 + 4 * n_pairs, dtype=torch.float64)  # iteration, then every pair's means

    def add(self, stats):
        """Record the stats of one or more iterations, (iterations, pairs, 4)."""
        while self.n + len(stats) > len(self.recent):  # resumed with a smaller log_every: saved rows come on top
            self.recent = torch.cat([self.recent, torch.zeros_like(self.recent)])
        self.recent[self.n:self.n + len(stats)] = stats
        self.n += len(stats)

    def unlogged(self, procs):
        """Every pair's stats since the last log line, (iterations, n_pairs, 4) (every process must call it)."""
        return procs.gather(self.recent[:self.n], dim=1)

    def close(self, it, stats):
        """Record the means of stats (every pair's, since the last log line) as iteration it's row; start anew."""
        means = stats.mean(0).cpu().double()
        self.history = torch.cat([self.history, torch.cat([torch.tensor([it]), means.flatten()])[None]])
        self.n = 0
        return means

    def state_dict(self, unlogged):
        return {'history': self.history, 'recent': unlogged.cpu()}

    def load_state_dict(self, state):
        self.history, self.n = state['history'], 0
        self.add(state['recent'][:, self.slots].to(self.recent))


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


class Training:
    """What a run trains and what a resume must find as it was: every pair's networks and Adam states (all pairs, in
    every process, each side with its origin: which pair each network started in), the noise and data streams,
    the swaps and the sides they moved, the loss log and the last iteration done.
    state_dict() is what a checkpoint keeps of it, load_state_dict() a resume."""

    def __init__(self, cfg, procs, images, dev, dtype):
        # seeding: one seed, one stream per purpose, the same in every process: the weights from torch's global
        # generator, the data order seed + 1 (each pair's own, with own_noise, in make_batches), the noise and the
        # input noise seed + 2 (the fixed noise of the samples seed + 3, in Recorder; each swap's pairing the seed
        # and its iteration, in random_stream)
        seed = cfg['seed']
        torch.manual_seed(seed)
        self.batches = make_batches(used_for_training(images, cfg).to(dev), cfg, seed + 1)
        self.G, self.D = make_pairs(cfg, images.shape[1], dev, dtype)
        self.noise_rng = torch.Generator(device=dev).manual_seed(seed + 2)
        self.swaps = []  # the iterations after which networks changed partners
        self.moved = set()  # the sides whose networks the swaps moved: 'D' (GAP's swap), 'G' (an edit's)
        self.log = LossLog(cfg['log_every'], cfg['n_pairs'], procs.slots, dev, dtype)
        self.iteration = -1  # the last iteration done

    def state_dict(self, unlogged):
        """unlogged: every pair's stats since the last log line (LossLog.unlogged)."""
        return {'iteration': self.iteration, 'pairing': self.D['origin'], 'generators': self.G['origin'],
                'swaps': self.swaps, 'moved': sorted(self.moved),
                **self.log.state_dict(unlogged), 'G': side_state(self.G), 'D': side_state(self.D),
                'noise_rng': self.noise_rng.get_state(), 'batches': self.batches.state_dict()}

    def load_state_dict(self, state, where):
        for name, side in (('G', self.G), ('D', self.D)):
            load_networks(side, state[name], where, name)
            side['solver'].load_state_dict(state[name]['solver'])
        self.noise_rng.set_state(state['noise_rng'])
        self.batches.load_state_dict(state['batches'])
        self.log.load_state_dict(state)
        self.D['origin'], self.iteration, self.swaps = list(state['pairing']), state['iteration'], state.get('swaps', [])
        self.G['origin'] = list(state.get('generators', self.G['origin']))  # checkpoints before generator swaps: none
        self.moved = set(state.get('moved', 'D' if self.swaps else ''))


class Recorder:
    """What a run shows and writes to out_dir (only the leader process writes): log lines, sample grids of the
    fixed noise, evaluations (metrics.csv, metrics.png), the checkpoint and losses.png."""

    def __init__(self, cfg, procs, training, images, labels):
        dev, dtype = training.noise_rng.device, first_weight(training.G).dtype
        self.cfg, self.leader, self.say, self.training = cfg, procs.leader, procs.say, training
        self.real = images[:2000] if cfg['dataset'] in MIXTURES else None  # drawn under 2-D samples
        n_fixed = 16 if self.real is None else 1000  # the same latent points in every sample dump
        self.fixed_z = draw_noise(cfg, n_fixed, torch.Generator().manual_seed(cfg['seed'] + 3), torch.float32).to(dev, dtype)
        evaluates = evaluates_at(cfg['iterations'] - 1, cfg)  # the last iteration does, when any does
        self.evaluator = Evaluator(cfg, dev, dtype, images, labels) if evaluates and self.leader else None
        if self.evaluator:  # a fresh run starts a fresh file; a resumed one redoes the evaluations after its checkpoint
            write_metrics(self.path('metrics.csv'), [], keep_until=training.iteration)

    def path(self, name):
        return os.path.join(self.cfg['out_dir'], name)

    def evaluate(self, it):
        """Score every generator and discriminator (the leader's copy of every pair must be up to date)."""
        if self.evaluator:
            rows = self.evaluator(self.training.G, self.training.D, it)
            write_metrics(self.path('metrics.csv'), rows, keep_until=it - 1)
            save_metrics_plot(self.path('metrics.png'), read_metrics(self.path('metrics.csv')))
            self.say(format_eval(rows, len(rows[0]['histogram'])))

    def save(self, it, unlogged):
        """The sample grid of iteration it, then the checkpoint; never of non-finite weights."""
        if not self.leader:
            return
        G, D = self.training.G, self.training.D
        bad = nonfinite_sides({'G': G, 'D': D})
        if bad:
            self.stop(f'a weight of {" and ".join(bad)} became non-finite by iteration {it}')
        number = it // self.cfg['sample_every'] + (it % self.cfg['sample_every'] != 0)
        by_generator = [G['origin'].index(g) for g in range(len(G['origin']))]  # the slot of G1, G2, ...
        save_samples(self.path(f'{number:03d}.png'), generate(G, to_slots(self.fixed_z, G))[by_generator], it,
                     [D['origin'][slot] for slot in by_generator], self.real)
        save_checkpoint(checkpoint_path(self.cfg), {'hyperparameters': self.cfg, 'block': block_values,
                                                    'code': algorithm_code(),
                                                    'device': self.fixed_z.device.type,
                                                    **self.training.state_dict(unlogged)})

    def losses(self):
        if self.leader:
            save_losses(self.path('losses.png'), self.training.log.history, self.cfg['n_pairs'], self.training.swaps,
                        self.training.moved)

    def stop_if_nonfinite(self, stats, first_it):
        bad = first_nonfinite(stats, first_it)
        if bad:
            self.stop(f'a loss of pair {bad[1]} became non-finite at iteration {bad[0]}')

    def stop(self, message):
        self.losses()
        sys.exit(f'parallel_gan.py: {message}; stopped. The last good checkpoint ({checkpoint_path(self.cfg)}) is untouched.')


class Speed:
    """Iterations per second of training alone: time spent evaluating and saving does not count."""

    def __init__(self, start):
        self.start, self.since, self.clock = start, start, time.perf_counter()

    def rate(self, it):
        """The rate since the previous call, iteration it included; None when only the run's first iteration was
        timed (a warm-up, not a rate)."""
        now = time.perf_counter()
        rate = (it + 1 - self.since) / max(now - self.clock, 1e-9) if it > self.start else None
        self.since, self.clock = it + 1, now
        return rate

    @contextmanager
    def paused(self):
        began = time.perf_counter()
        yield
        self.clock += time.perf_counter() - began


@contextmanager
def interrupts_caught(procs):
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
    check_losses()
    procs = Processes(cfg)
    check_backward(cfg, data_dim(cfg['dataset']), procs.say)
    try:
        with claim_out_dir(cfg) if procs.leader else nullcontext():  # before any slow step; held until the end
            status = run(cfg, procs)
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


def run(cfg, procs):
    """Set a run up (afresh or from its checkpoint) and train it; 0 when done, 130 when interrupted (and saved)."""
    dev, dtype = procs.device, getattr(torch, cfg['dtype'])
    say = procs.say
    if cfg['threads']:
        torch.set_num_threads(cfg['threads'])
    state = load_checkpoint(checkpoint_path(cfg), cfg, dev) if cfg['resume'] else None
    if state and state['iteration'] + 1 >= cfg['iterations']:
        say(f'nothing to train: the run in {cfg["out_dir"]} stopped after iteration {state["iteration"]}, and it already '
            f'reached --iterations={cfg["iterations"]}; raise it to go on')
        return 0
    say(f'loading the {cfg["dataset"]} training set' + (f' from {cfg["data_root"]}' if cfg['dataset'] in IMAGE_DATASETS else ''))
    images, labels = training_data(cfg)
    training = Training(cfg, procs, images, dev, dtype)
    if state:
        training.load_state_dict(state, checkpoint_path(cfg))  # refuses other networks, naming the layers
        differ = code_differences(state.get('code'), algorithm_code())
        if differ and not cfg['resume_edited']:
            refuse(f'cannot resume from {checkpoint_path(cfg)}: the algorithm\'s code differs from the one that trained '
                   f'it ({differ}); --resume_edited=True continues it with the code as it is now')
        saved = state['hyperparameters']
        changes = '; '.join(f'{k}={saved[k]!r} there, {cfg[k]!r} now' for k in RESUMABLE
                            if k != 'resume' and k in saved and saved[k] != cfg[k])
        say(f'resumed from {checkpoint_path(cfg)} after iteration {state["iteration"]}'
            + (f', with these changes: {changes}' if changes else ', with its own hyperparameters'))
    G, D = share_of_process(training, cfg, procs)
    with interrupts_caught(procs) as interrupted:  # from here on a Ctrl-C ends in a checkpoint
        recorder = Recorder(cfg, procs, training, images, labels)
        say(f'GAP: {cfg["n_pairs"]} pairs, K={cfg["K"]}, {len(training.batches.data)} {cfg["dataset"]} training points, '
            f'device {dev}, {cfg["dtype"]}, {count(procs.world, "process")} x {count(torch.get_num_threads(), "thread")}, '
            f'iterations {training.iteration + 1}..{cfg["iterations"] - 1}')
        if cfg['eval_every'] and not recorder.evaluator:
            say(f'no evaluation: the run ends before eval_every={cfg["eval_every"]}; for metrics of a short run, '
                f'add --eval_at_end=True (or a smaller --eval_every)')
        stopped = train_loop(cfg, procs, training, G, D, recorder, interrupted)
    return 130 if stopped else 0


# ------------------------------------------------------------------------------------
# CUDA graphs: on a GPU the loop is bound by launching small kernels, so stretches of iterations with
# nothing for the host to do are captured once and replayed. The eager loop stays the definition.

def quiet_stretch(it, cfg, batches):
    """How many iterations from it on need nothing from the host: no log line, swap, evaluation, sample,
    checkpoint or last iteration, and no batch that runs into a new epoch (whose shuffle runs eagerly)."""
    periods = [cfg['log_every'], cfg['sample_every']] + [p for p in (cfg['eval_every'],) if p]
    horizon = min(min((-it) % p for p in periods), cfg['iterations'] - 1 - it,
                  (len(batches.order) - batches.pos) // batches.mb_size, GraphedIterations.BLOCKS[0])
    return max(0, next((k for k in range(horizon) if swaps_at(it + k, cfg)), horizon))


class GraphedIterations:
    """Iterations as replays of captured CUDA graphs of BLOCKS[k] iterations each. What a graph captures is
    gap_iteration itself, the loop's own iteration (so an edit there trains here too), reading the noise from the
    same generator (registered with each graph, so every replay draws what the eager calls would) and its batches
    through next(): the rows of a device copy of the epoch's order at a device cursor. The losses and weights
    are the eager loop's, bit for bit. What gap_iteration decides on the host (its Python code, a schedule read
    from `it`) is fixed when a graph is captured; quiet_stretch keeps swaps and epoch ends out of the graphs."""
    BLOCKS = (64, 16, 4, 1)

    def __init__(self, G, D, batches, noise_rng, cfg, procs):
        self.G, self.D, self.batches, self.noise_rng, self.cfg, self.procs = G, D, batches, noise_rng, cfg, procs
        dev, self.dtype = noise_rng.device, first_weight(G).dtype
        self.order = batches.order.clone()  # the current epoch's order, where the graphs read it
        self.order_of = batches.order  # which of Batches' orders self.order holds
        self.cursor = torch.zeros((), dtype=torch.long, device=dev)  # batches.pos, on the device
        self.rows = torch.arange(cfg['mb_size'], device=dev)
        self.stats = torch.zeros(self.BLOCKS[0], G['model'].n_pairs, 4, device=dev, dtype=self.dtype)
        self.pool, self.graphs, self.generators = None, {}, G['origin']

    def next(self):
        """The next minibatch as Batches.next gives it, read on the device: the epoch's order at the cursor."""
        batch = self.batches.data.index_select(0, self.order.index_select(0, self.cursor + self.rows))
        self.cursor += self.cfg['mb_size']
        return batch

    def iterations(self, it, length):
        """The work of `length` quiet iterations from it on, all on the device: what a graph captures."""
        for k in range(length):
            self.stats[k] = gap_iteration(it + k, self.G, self.D, self, self.noise_rng, self.cfg, self.procs)[0]

    def capture(self, it, length):
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.noise_rng)  # each replay draws the noise the eager calls would
        self.pool = self.pool or torch.cuda.graph_pool_handle()  # one memory pool for all the graphs
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                self.iterations(it, length)
        except RuntimeError as error:  # e.g. an edit that reads a value on the host (.item()) or draws on the CPU
            sys.exit(f'parallel_gan.py: CUDA graphs cannot capture gap_iteration as it is '
                     f'({str(error).splitlines()[0]}); run it eagerly with --cuda_graphs=False')
        return graph

    def run(self, it, n):
        """Run the n iterations from it on (all quiet); returns their stats, (n, pairs, 4), valid until the next call."""
        length = next(b for b in self.BLOCKS if b <= n)
        if self.order_of is not self.batches.order:  # a new epoch began in an eager iteration
            self.order.copy_(self.batches.order)
            self.order_of = self.batches.order
        if self.generators != self.G['origin'] and self.cfg['prior'] == 'mixed':  # generators moved (an edit's
            self.pool, self.graphs = None, {}  # swap): which slot gets which prior is fixed when a graph is captured
            self.generators = self.G['origin']
        if length not in self.graphs:
            self.graphs[length] = self.capture(it, length)
        self.cursor.fill_(self.batches.pos)
        self.graphs[length].replay()
        self.batches.pos += length * self.cfg['mb_size']
        return self.stats[:length]


def use_cuda_graphs(dev, cfg):
    """On a GPU unless cuda_graphs=False, with the shipped losses and both sides' written-out backward (autograd
    runs eagerly), and every pair on the same batch and no input noise (whose draws run eagerly)."""
    return (dev.type == 'cuda' and cfg['cuda_graphs'] and set(verified_closed_forms) == {d_loss, g_loss}
            and written_out_confirmed == {'G': True, 'D': True} and not cfg['own_noise'] and not cfg['input_noise'])


def iteration_runner(G, D, batches, noise_rng, cfg, procs):
    """advance(it) -> (stats of each iteration done, partners of a swap at its last one or None): one eager
    gap_iteration, or, on a GPU with cuda_graphs, as many quiet iterations as one graph replay does."""
    graphs = GraphedIterations(G, D, batches, noise_rng, cfg, procs) if use_cuda_graphs(noise_rng.device, cfg) else None
    warmed_up = []  # capture only after an eager iteration in this process: Adam's state, cuBLAS's set-up

    def advance(it):
        quiet = quiet_stretch(it, cfg, batches) if graphs and warmed_up else 0
        if quiet:
            return graphs.run(it, quiet), None
        stats, partners = gap_iteration(it, G, D, batches, noise_rng, cfg, procs)
        warmed_up[:] = [True]
        return stats[None], partners
    return advance


if __name__ == '__main__':
    cfg = parse_args(sys.argv[1:])
    status = compare_runs(cfg) if cfg['compare'] else train(cfg)
    if int(os.environ.get('WORLD_SIZE', 1)) > 1:  # under torchrun, a finished process skips the interpreter's
        sys.stdout.flush()  # teardown, where a gloo thread still running as C++ statics are destroyed can abort it
        sys.stderr.flush()  # (std::terminate, exit status -6) after the run and its files are complete
        os._exit(status)
    sys.exit(status)
