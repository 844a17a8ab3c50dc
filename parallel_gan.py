"""
Generative Adversarial Parallelization (GAP) on MNIST, Fashion-MNIST and 2-D mixtures.

Im, Ma, Kim & Taylor, "Generative Adversarial Parallelization", arXiv:1612.04021.
Several GANs train side by side on the same data; every K iterations their
discriminators change partners, so no generator stays coupled to one
discriminator. K=0 never swaps: independent GANs, the baseline GAP is compared with.

    python parallel_gan.py                      # the reference run: 2 pairs, K=100, MNIST
    python parallel_gan.py --K=0 --n_pairs=4    # override any hyperparameter below
    python parallel_gan.py --help               # list them all
    torchrun --nproc_per_node=2 parallel_gan.py # one pair per process, as in the paper

Writes out/NNN.png (samples from a fixed noise batch), out/losses.png, out/metrics.csv
and out/metrics.png (mode coverage and sample quality), and out/checkpoint.pt (resume
with --resume=True).

Where things are, top to bottom: the hyperparameters; the command line; the data; the
networks (Stack: all pairs' networks of one side as one stack of weights); the losses
(d_loss, g_loss) and every pair's step (train_step); the swap (new_partners,
swap_discriminators) and one iteration of the loop (gap_iteration); checkpoints; the
evaluation (Evaluator); pictures; the processes of a torchrun launch (Processes); and
the training loop (run).
"""
import csv
import math
import os
import re
import signal
import sys
import time
import zlib
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO

import torch
import torch.nn.functional as F
from torch import nn

# --- hyperparameters (override any of them as --name=value) -------------------------
# networks
z_dim = 10  # noise dimensions fed to each generator
h_dim = 128  # hidden units of every generator and discriminator
# GAP
n_pairs = 2  # generator/discriminator pairs trained side by side
K = 100  # the discriminators change partners every K iterations (0: never, independent GANs)
# training
mb_size = 32  # minibatch size; every pair sees the same noise and the same real batch
lr = 1e-3  # Adam learning rate of every network
iterations = 1_000_000  # training iterations
seed = 0  # seeds the weights, the noise, the data order and the pairings
# output
log_every = 1000  # print a log line (means since the previous one) every this many iterations
sample_every = 1000  # write out/NNN.png and the checkpoint every this many iterations
out_dir = 'out'  # where samples, plots and the checkpoint go
resume = False  # continue from out_dir/checkpoint.pt exactly where it stopped
# data
dataset = 'mnist'  # 'mnist', 'fashion_mnist', or the 2-D Gaussian mixtures 'ring8' and 'grid25'
data_root = 'out/data'  # MNIST lives in data_root/MNIST/raw, Fashion-MNIST in data_root/FashionMNIST/raw
# evaluation: mode coverage and sample quality, GAP against no-swap
eval_every = 10_000  # evaluate every this many iterations and at the end (0: never)
eval_samples = 10_000  # samples per generator in each evaluation
classifier_dir = 'out/classifiers'  # where the classifier that scores image samples is cached
# system
device = 'auto'  # 'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'
dtype = 'float32'  # 'float32' or 'float64' for every weight and computation
threads = 0  # CPU threads torch may use (0: torch's default)
# --- end of hyperparameters ---------------------------------------------------------

CLASSIFIER_VERSION = 1  # bump when Classifier or its training changes, so caches are rebuilt
CLASSIFIER_EPOCHS = {'mnist': 3, 'fashion_mnist': 6}
COLLECTIVE_TIMEOUT = 300  # seconds a process waits for the others before it gives up
SHAPE_KEYS = ('z_dim', 'h_dim', 'n_pairs', 'dtype', 'dataset')  # a checkpoint only fits networks of its own shape
IMAGE_DATASETS = {'mnist': 'MNIST', 'fashion_mnist': 'FashionMNIST'}  # torchvision's class and folder names
MIXTURES = ('ring8', 'grid25')
MNIST_FILES = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte',
               't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')  # the same four names for Fashion-MNIST


# ------------------------------------------------------------------------------------
# command line: --name=value, checked against the default's type

def hyperparameters():
    """(name, default, meaning) of each line of the block above, read from this file so --help never drifts."""
    with open(__file__) as f:
        block = f.read().split('# --- hyperparameters')[1].split('# --- end of hyperparameters')[0]
    return [(m[1], globals()[m[1]], m[2]) for m in re.finditer(r'^(\w+) = .*?  # (.*)$', block, re.M)]


def refuse(message):
    """Bad input: one line on stderr and exit status 2, before any work starts."""
    print(f'parallel_gan.py: error: {message}', file=sys.stderr)
    sys.exit(2)


def convert(name, text, default):
    """The text of --name=text as a value of the default's type, or a refusal saying what is accepted."""
    kind = type(default)
    try:
        if kind is bool:
            return {'true': True, '1': True, 'false': False, '0': False}[text.lower()]
        return kind(text)
    except (KeyError, ValueError):
        accepted = {bool: 'True or False', int: 'an integer', float: 'a number', str: 'a string'}[kind]
        refuse(f'--{name}={text}: expected {accepted} (default {default!r})')


def check(cfg):
    """Refuse values that make no sense, before any work starts."""
    rules = [
        (cfg['z_dim'] >= 1, 'z_dim must be at least 1'),
        (cfg['h_dim'] >= 1, 'h_dim must be at least 1'),
        (cfg['n_pairs'] >= 1, 'n_pairs must be at least 1'),
        (cfg['K'] >= 0, 'K must be 0 (never swap) or a positive number of iterations'),
        (cfg['K'] == 0 or cfg['n_pairs'] >= 2, 'K>0 swaps discriminators between pairs: it needs n_pairs >= 2 (or K=0)'),
        (cfg['mb_size'] >= 1, 'mb_size must be at least 1'),
        (cfg['lr'] > 0 and math.isfinite(cfg['lr']), 'lr must be a positive number'),
        (cfg['iterations'] >= 1, 'iterations must be at least 1'),
        (cfg['log_every'] >= 1, 'log_every must be at least 1'),
        (cfg['sample_every'] >= 1, 'sample_every must be at least 1'),
        (cfg['threads'] >= 0, 'threads must be 0 (torch default) or a positive count'),
        (cfg['dataset'] in (*IMAGE_DATASETS, *MIXTURES), f"dataset must be one of {', '.join((*IMAGE_DATASETS, *MIXTURES))}"),
        (cfg['eval_every'] >= 0, 'eval_every must be 0 (never) or a positive number of iterations'),
        (cfg['eval_samples'] >= 2, 'eval_samples must be at least 2'),
        (cfg['dtype'] in ('float32', 'float64'), "dtype must be 'float32' or 'float64'"),
        (re.fullmatch(r'auto|cpu|cuda(:\d+)?', cfg['device']) is not None,
         "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        (not cfg['device'].startswith('cuda') or torch.cuda.is_available(),
         f"device {cfg['device']!r} asked for, but CUDA is not available here (use --device=cpu or auto)"),
    ]
    for ok, message in rules:
        if not ok:
            refuse(message)


def parse_args(argv):
    """The hyperparameters: the defaults above, overridden by --name=value arguments."""
    table = hyperparameters()
    cfg = {name: default for name, default, _ in table}
    for arg in argv:
        if arg in ('-h', '--help'):
            print(__doc__.strip() + '\n\nhyperparameters (--name=value):')
            for name, default, meaning in table:
                print(f'  --{name:<15} {default!r:<18} {meaning}')
            sys.exit(0)
        name, eq, text = arg[2:].partition('=')
        if not (arg.startswith('--') and eq and name in cfg):
            refuse(f'unknown argument {arg!r}: use --name=value with a name from: {", ".join(cfg)}')
        cfg[name] = convert(name, text, cfg[name])
    check(cfg)
    return cfg


# ------------------------------------------------------------------------------------
# data: the whole training set as one uint8 tensor on the training device

def load_images(dataset, root, train=True):
    """MNIST or Fashion-MNIST as uint8 (N, 784) images and labels; one clear message and exit 1 when they cannot be had."""
    import torchvision
    folder = IMAGE_DATASETS[dataset]
    raw = os.path.join(root, folder, 'raw')
    try:
        quiet = StringIO()  # torchvision narrates every failed mirror; the message below says what matters
        with redirect_stdout(quiet), redirect_stderr(quiet):
            data = getattr(torchvision.datasets, folder)(root, train=train, download=True)
        images, labels = data.data, data.targets
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        sys.exit(f'parallel_gan.py: could not load {folder} from {raw}/ ({reason}).\n'
                 f'To run offline, put the four uncompressed files {", ".join(MNIST_FILES)}\n'
                 f'in {raw}/ (torchvision\'s raw layout), or point --data_root at a folder that has them.')
    return images.reshape(len(images), -1), labels


def mixture(dataset):
    """Centres (modes, 2) and standard deviation of a 2-D Gaussian mixture, scaled into [0, 1] so a
    sigmoid output can reach every point: 8 Gaussians on a circle of radius 2, or a 5x5 grid with
    spacing 2, as in the mode-collapse literature, each with std 0.1 (the literature's 0.02 and 0.05
    are too fine for these one-hidden-layer networks to resolve once scaled into [0, 1])."""
    if dataset == 'ring8':
        angle = torch.arange(8) * 2 * math.pi / 8
        centres, std, half_width = 2 * torch.stack([angle.cos(), angle.sin()], 1), 0.1, 2.5
    else:
        axis = torch.arange(-4, 5, 2.0)
        centres, std, half_width = torch.cartesian_prod(axis, axis), 0.1, 5.0
    return (centres + half_width) / (2 * half_width), std / (2 * half_width)


def sample_mixture(dataset, n, seed):
    """n points of a 2-D mixture (float32, in [0, 1]) and the index of the mode each came from."""
    rng = torch.Generator().manual_seed(seed)
    centres, std = mixture(dataset)
    modes = torch.randint(len(centres), (n,), generator=rng)
    return (centres[modes] + std * torch.randn(n, 2, generator=rng)).clamp(0, 1), modes


def training_data(cfg):
    """The training set and its labels: image pixels as uint8 (N, 784), or 60,000 points of a 2-D mixture."""
    if cfg['dataset'] in MIXTURES:
        return sample_mixture(cfg['dataset'], 60_000, seed=12345)  # one fixed training set for every seed
    return load_images(cfg['dataset'], cfg['data_root'])


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


def as_inputs(batch, dtype):
    """A batch as network inputs in [0, 1]. Images stay uint8 until a batch is drawn, which quarters their memory."""
    return batch.to(dtype) / 255 if batch.dtype == torch.uint8 else batch.to(dtype)


# ------------------------------------------------------------------------------------
# networks: all pairs' networks of one side held as one stack of weights

class Stack(nn.Module):
    """n copies of the MLP n_in -> n_hidden -> ReLU -> n_out, network i being slice i.

    Holding the pairs' networks as stacked weights lets every pair run in the same
    batched matrix product; per pair the maths is exactly nn.Sequential(Linear, ReLU,
    Linear), initialised the way nn.Linear is. The backward pass is written out (two
    layers: a handful of products), which computes only the gradients that are used and
    runs about 1.4x faster than autograd at this size; tests pin it to autograd."""

    def __init__(self, n, n_in, n_hidden, n_out):
        super().__init__()
        self.W1, self.b1 = self.linear(n, n_in, n_hidden)
        self.W2, self.b2 = self.linear(n, n_hidden, n_out)

    @staticmethod
    def linear(n, n_in, n_out):
        bound = 1 / math.sqrt(n_in)
        uniform = lambda *shape: nn.Parameter(torch.empty(*shape).uniform_(-bound, bound), requires_grad=False)
        return uniform(n, n_in, n_out), uniform(n, 1, n_out)

    def expand(self, x):
        """A (batch, n_in) input shared by every network, as (n, batch, n_in)."""
        return x.expand(len(self.W1), *x.shape[-2:])

    def sizes(self):
        """(n_in, n_out) of each network."""
        return self.W1.shape[1], self.W2.shape[2]

    def forward(self, x):
        """(output, hidden) for x: (n, batch, n_in), or (batch, n_in) shared by every network."""
        hidden = torch.baddbmm(self.b1, self.expand(x), self.W1).relu_()
        return torch.baddbmm(self.b2, hidden, self.W2), hidden

    def backward(self, x, hidden, grad_output, weights=True, inputs=False):
        """Given d(loss)/d(output), write d(loss)/d(weight) into each weight's .grad (if weights)
        and return d(loss)/d(x) (if inputs)."""
        # through the ReLU: aten's one-kernel form of grad * (hidden > 0)
        grad_hidden = torch.ops.aten.threshold_backward(torch.bmm(grad_output, self.W2.transpose(1, 2)), hidden, 0)
        if weights:
            torch.bmm(hidden.transpose(1, 2), grad_output, out=self.W2.grad)
            torch.sum(grad_output, 1, keepdim=True, out=self.b2.grad)
            torch.bmm(self.expand(x).transpose(1, 2), grad_hidden, out=self.W1.grad)
            torch.sum(grad_hidden, 1, keepdim=True, out=self.b1.grad)
        return torch.bmm(grad_hidden, self.W1.transpose(1, 2)) if inputs else None


class Adam(torch.optim.Adam):
    """torch's fused Adam without the generic Optimizer.step bookkeeping (hooks, profiler records,
    grad-scaler checks), which at this size costs about as much as the update itself. Same state,
    same update kernel: the tests pin it to torch.optim.Adam through the reference loop."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr, fused=True)

    def step(self):  # no torch.no_grad() needed: no weight here requires grad
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


def make_side(n, n_in, n_out, cfg, dev, dtype):
    """One side of the pairs (all generators, or all discriminators): {'model': stacked networks, 'solver': Adam}.

    One Adam over the stack is one Adam per network: Adam's update is elementwise."""
    model = Stack(n, n_in, cfg['h_dim'], n_out).to(dev, dtype)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    return {'model': model, 'solver': Adam(model.parameters(), lr=cfg['lr'])}


def make_pairs(cfg, x_dim, dev, dtype):
    """G: noise -> pixel logits (a sigmoid makes pixels); D: pixels -> logit of P(real)."""
    G = make_side(cfg['n_pairs'], cfg['z_dim'], x_dim, cfg, dev, dtype)
    D = make_side(cfg['n_pairs'], x_dim, 1, cfg, dev, dtype)
    return G, D


def generate(G, z):
    """Each generator's samples of the noise z: (n_pairs, batch, 784) pixels in [0, 1], and G's hidden layer."""
    logits, hidden = G['model'](z)
    return logits.sigmoid_(), hidden


# ------------------------------------------------------------------------------------
# the GAN losses, from D's logits: log D = -softplus(-logit), log(1 - D) = -softplus(logit),
# so they cannot overflow to inf or NaN the way log(sigmoid) can.

def d_loss(real_logit, fake_logit):
    """-mean(log D(x) + log(1 - D(G(z)))), one value per pair."""
    return F.softplus(-real_logit).mean((1, 2)) + F.softplus(fake_logit).mean((1, 2))


def g_loss(fake_logit):
    """-mean(log D(G(z))), one value per pair (the non-saturating generator loss)."""
    return F.softplus(-fake_logit).mean((1, 2))


def train_step(G, D, z, x):
    """One GAP iteration for every pair at once: a D step, then a G step against the just-updated D.
    Pair i's losses reach only pair i's networks, and nothing leaks from one step into the next.

    Returns (n_pairs, 4): D_loss, G_loss, mean D(x), mean D(G(z)) of the D step."""
    mb = len(x)
    fake, G_hidden = generate(G, z)  # each G runs once; the G step below reuses it

    # D step: one pass over the real and the fake batch together
    both = torch.cat([x.expand(len(fake), -1, -1), fake], 1)
    logit, D_hidden = D['model'](both)
    D_loss = d_loss(logit[:, :mb], logit[:, mb:])
    D_prob = torch.sigmoid(logit)
    grad_logit = D_prob.clone()  # d D_loss / d logit: (D(x) - 1) / mb on real, D(G(z)) / mb on fake
    grad_logit[:, :mb] -= 1
    D['model'].backward(both, D_hidden, grad_logit.div_(mb))
    D['solver'].step()

    # G step: D scores the same samples again, after its update; only G's weights change
    logit, D_hidden = D['model'](fake)
    G_loss = g_loss(logit)
    grad_fake = D['model'].backward(fake, D_hidden, (torch.sigmoid(logit) - 1) / mb, weights=False, inputs=True)
    G['model'].backward(z, G_hidden, torch.ops.aten.sigmoid_backward(grad_fake, fake))  # grad * fake * (1 - fake)
    G['solver'].step()

    return torch.stack([D_loss, G_loss, D_prob[:, :mb].mean((1, 2)), D_prob[:, mb:].mean((1, 2))], 1)


# ------------------------------------------------------------------------------------
# the GAP swap

def new_partners(n_pairs, seed, it):
    """The pairing after a swap at iteration it: generator i gets discriminator partners[i].

    A random permutation in which no discriminator stays with its generator (the paper's
    random pairing; with two pairs, an exchange), drawn from (seed, it) alone so a resumed
    run draws the same one."""
    rng = torch.Generator().manual_seed(seed * 1_000_003 + it)
    while True:
        partners = torch.randperm(n_pairs, generator=rng)
        if (partners != torch.arange(n_pairs)).all():
            return partners


def swap_discriminators(D, partners, procs=None):
    """Each discriminator, with its Adam state, moves to another generator:
    generator i now trains against the discriminator that was at partners[i].

    Across processes (procs), each process first gathers every process's discriminators,
    then keeps the ones its own generators get."""
    take = partners if procs is None else partners[procs.slots]
    gather = (lambda t: t) if procs is None else procs.gather
    dev = D['model'].W1.device
    take = take.pin_memory().to(dev, non_blocking=True) if dev.type == 'cuda' else take  # no host sync
    for p in D['model'].parameters():
        state = D['solver'].state[p]  # Adam's 'step' is the same for every discriminator
        for tensor in (p, state['exp_avg'], state['exp_avg_sq']):
            tensor.copy_(gather(tensor)[take])


def gap_iteration(it, G, D, batches, noise, cfg, procs=None):
    """Iteration it of the training loop: fresh noise and a batch, every pair's step, and every
    K iterations a swap. Returns train_step's stats and the swap's partners (None without a swap)."""
    dtype = G['model'].W1.dtype
    z = torch.randn(cfg['mb_size'], cfg['z_dim'], generator=noise, device=noise.device, dtype=dtype)
    stats = train_step(G, D, z, as_inputs(batches.next(), dtype))
    swapping = cfg['K'] and it % cfg['K'] == 0 and it != 0  # K=0: never
    if not swapping:
        return stats, None
    partners = new_partners(cfg['n_pairs'], cfg['seed'], it)
    swap_discriminators(D, partners, procs)
    return stats, partners


# ------------------------------------------------------------------------------------
# checkpoint: written atomically, loaded with weights_only=True

def save_checkpoint(path, state):
    """Write to a temporary file, then rename: a crash while saving never leaves a broken checkpoint."""
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, cfg, dev):
    """The checkpoint's state, or a clear refusal when it is missing, damaged or of other networks."""
    if not os.path.exists(path):
        refuse(f'--resume=True but there is no checkpoint at {path}')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)  # loading into the networks moves it
        saved = state['hyperparameters']
        state['iteration'], state['G'], state['D'], state['pairing']  # everything a resume needs is there
    except Exception as error:
        refuse(f'cannot resume: {path} is damaged or not a checkpoint of this script ({type(error).__name__})')
    changed = [f'{k}={saved.get(k)!r} there, {cfg[k]!r} now' for k in SHAPE_KEYS if saved.get(k) != cfg[k]]
    if changed:
        refuse(f'cannot resume from {path}: it holds other networks ({"; ".join(changed)})')
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
        start = time.perf_counter()
        model = fit_classifier(images, labels, CLASSIFIER_EPOCHS[cfg['dataset']], dev)
        how = f'trained in {time.perf_counter() - start:.0f}s'
        try:
            os.makedirs(cfg['classifier_dir'], exist_ok=True)
            save_checkpoint(path, {'fingerprint': fingerprint, 'model': model.state_dict()})
            how += f', cached in {path}'
        except OSError as error:
            how += f', not cached ({error.strerror}: {cfg["classifier_dir"]})'
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
    return {'modes': covered, 'kl': kl, 'score': score, 'confidence': probs.max(1).values.mean().item(),
            'fd': frechet_distance(feature_stats(features), test_stats), 'high_quality': float('nan'),
            'histogram': (counts.double() / len(probs)).tolist()}


def mixture_metrics(points, dataset, real_stats):
    """For 2-D samples: modes covered (at least a third of their fair share within 3 standard deviations),
    the share of samples within 3 standard deviations of some mode, KL of that histogram to uniform, and
    the Frechet distance of the points themselves to the real distribution."""
    centres, std = mixture(dataset)
    distance, nearest = torch.cdist(points.double().cpu(), centres.double()).min(1)
    close = distance <= 3 * std
    counts = torch.bincount(nearest[close], minlength=len(centres))
    covered, kl = coverage(counts, len(points))
    return {'modes': covered, 'kl': kl, 'score': float('nan'), 'confidence': float('nan'),
            'fd': frechet_distance(feature_stats(points.cpu()), real_stats), 'high_quality': close.double().mean().item(),
            'histogram': (counts.double() / len(points)).tolist()}


@torch.no_grad()
def cross_scores(D, samples):
    """The paper's cross-scoring (GAM-II style): scores[d, g] = mean D_d(G_g(z)), every discriminator's mean
    output on every generator's samples; rows follow the discriminators' slots."""
    return torch.stack([torch.sigmoid(D['model'](s)[0]).mean((1, 2)) for s in samples], 1).double().cpu()


class Evaluator:
    """Scores every generator on eval_samples samples: coverage, quality and the discriminator pool's verdict."""

    def __init__(self, cfg, dev, dtype, train_data, train_labels):
        self.cfg, self.dev, self.dtype = cfg, dev, dtype
        if cfg['dataset'] in MIXTURES:
            self.classifier = None
            self.reference = feature_stats(sample_mixture(cfg['dataset'], cfg['eval_samples'], seed=54321)[0])
        else:
            self.classifier, self.reference = load_classifier(cfg, dev, train_data, train_labels)

    def __call__(self, G, D, pairing, it):
        """One row per generator: its metrics, and its mean and worst score over the pool of discriminators."""
        rng = torch.Generator(device=self.dev).manual_seed(self.cfg['seed'] * 1_000_003 + it + 7)  # training RNGs untouched
        chunks, probs, features, samples = [], [], [], []
        for n in torch.arange(self.cfg['eval_samples']).split(1000):
            z = torch.randn(len(n), self.cfg['z_dim'], generator=rng, device=self.dev, dtype=self.dtype)
            fake = generate(G, z)[0]
            chunks.append(cross_scores(D, fake) * len(n))
            if self.classifier is None:
                samples.append(fake.cpu())
            else:
                p, f = zip(*(classify(self.classifier, g) for g in fake))
                probs.append(torch.stack(p))
                features.append(torch.stack(f))
        by_slot = sum(chunks) / self.cfg['eval_samples']
        scores = torch.empty_like(by_slot)
        scores[pairing] = by_slot  # row d: the discriminator that started in pair d
        rows = []
        for g in range(len(pairing)):
            if self.classifier is None:
                metrics = mixture_metrics(torch.cat([s[g] for s in samples]), self.cfg['dataset'], self.reference)
            else:
                metrics = image_metrics(torch.cat([p[g] for p in probs]), torch.cat([f[g] for f in features]),
                                        self.reference)
            rows.append({'iteration': it, 'generator': g + 1, **metrics, 'pool_mean': scores[:, g].mean().item(),
                         'pool_worst': scores[:, g].min().item(), 'd_scores': scores[:, g].tolist()})
        return rows


METRIC_COLUMNS = ('iteration', 'generator', 'modes', 'kl', 'score', 'confidence', 'fd', 'high_quality',
                  'pool_mean', 'pool_worst', 'histogram', 'd_scores')


def write_metrics(path, rows, keep_until=None):
    """Append rows to metrics.csv (lists as space-separated numbers). With keep_until, first drop the rows of
    later iterations: a resumed run redoes them."""
    old = []
    if keep_until is not None and os.path.exists(path):
        with open(path) as f:
            old = [row for row in csv.DictReader(f) if int(row['iteration']) <= keep_until]
    fresh = keep_until is not None or not os.path.exists(path)
    with open(path, 'w' if fresh else 'a', newline='') as f:
        writer = csv.DictWriter(f, METRIC_COLUMNS)
        if fresh:
            writer.writeheader()
            writer.writerows(old)
        for row in rows:
            writer.writerow({k: ' '.join(f'{v:.4g}' for v in row[k]) if isinstance(row[k], list)
                             else f'{row[k]:.6g}' if isinstance(row[k], float) else row[k] for k in METRIC_COLUMNS})


def read_metrics(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def format_eval(rows, n_modes):
    """One compact log line for an evaluation: per generator (G1/G2/...)."""
    join = lambda key, fmt: '/'.join(format(row[key], fmt) for row in rows)
    quality = f'score {join("score", ".2f")}' if math.isfinite(rows[0]['score']) else f'in 3 std {join("high_quality", ".2f")}'
    return (f'eval {rows[0]["iteration"]:>5} | modes {join("modes", "d")} of {n_modes} | KL {join("kl", ".3f")} | '
            f'{quality} | FD {join("fd", ".3g")} | D-pool mean {join("pool_mean", ".2f")} worst {join("pool_worst", ".2f")}')


# ------------------------------------------------------------------------------------
# pictures

def pyplot():
    """matplotlib's pyplot, drawing to files only (no display needed)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def save_samples(path, samples, it, pairing, real=None):
    """Images: a 4x4 grid of 16 samples per generator. 2-D data: each generator's samples over the real
    points. Panels are labelled G1, G2, ... with their current discriminator."""
    plt = pyplot()
    n = len(samples)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis('off')
    for i, points in enumerate(samples.cpu().float()):
        ax = axes.flat[i]
        if real is None:
            grid = torch.ones(4 * 30 - 2, 4 * 30 - 2)
            for k, image in enumerate(points[:16].reshape(16, 28, 28)):
                grid[30 * (k // 4):30 * (k // 4) + 28, 30 * (k % 4):30 * (k % 4) + 28] = image
            ax.imshow(grid.numpy(), cmap='Greys_r', vmin=0, vmax=1)
        else:
            ax.scatter(*real[:2000].T.numpy(), s=1, c='lightgrey')
            ax.scatter(*points.T.numpy(), s=1, c='C3')
            ax.set(xlim=(0, 1), ylim=(0, 1), aspect='equal')
        ax.set_title(f'G{i + 1}' + (f' (with D{pairing[i] + 1})' if n > 1 else ''))
    fig.suptitle(f'iteration {it}')
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_losses(path, history, n_pairs, K):
    """Each pair's D and G loss over the run (means over each log interval), with the swaps marked."""
    plt = pyplot()
    if len(history) == 0:
        return
    its = history[:, 0].numpy()
    stats = history[:, 1:].reshape(len(history), n_pairs, 4).numpy()
    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    swaps = range(K, int(its[-1]) + 1, K) if K else []
    for ax, column, name in ((axes[0], 0, 'D_loss'), (axes[1], 1, 'G_loss')):
        for i in range(n_pairs):
            ax.plot(its, stats[:, i, column], label=f'pair {i + 1}', lw=1)
        if 0 < len(swaps) <= 100:
            ax.vlines(swaps, 0, 1, transform=ax.get_xaxis_transform(), colors='grey', alpha=0.3, lw=0.8)
        ax.set_ylabel(name)
        ax.legend(loc='upper right', fontsize=8)
    axes[1].set_xlabel('iteration')
    title = ('no swaps (K=0)' if not K else f'discriminators swap every K={K} iterations'
             + (' (grey lines)' if 0 < len(swaps) <= 100 else f' ({len(swaps)} swaps, too dense to draw)'))
    axes[0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_metrics_plot(path, rows):
    """Modes covered, KL to uniform and Frechet distance over the run, a line per generator."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, name in zip(axes, ('modes', 'kl', 'fd'), ('modes covered', 'KL(histogram || uniform)', 'Frechet distance')):
        for g in sorted({int(r['generator']) for r in rows}):
            mine = [r for r in rows if int(r['generator']) == g]
            ax.plot([int(r['iteration']) for r in mine], [float(r[key]) for r in mine], marker='o', ms=3, label=f'G{g}')
        ax.set(title=name, xlabel='iteration')
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


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
        cuda = cfg['device'].startswith('cuda') or (cfg['device'] == 'auto' and torch.cuda.is_available())
        self.device = pick_device(cfg['device'])
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


# ------------------------------------------------------------------------------------
# the run

def pick_device(name):
    return torch.device('cuda' if name == 'auto' and torch.cuda.is_available() else 'cpu' if name == 'auto' else name)


def format_log(it, stats, rate, left):
    """One line: the iteration, then per pair (G1/G2/...) D_loss, G_loss, mean D(x), mean D(G(z))."""
    join = lambda column, fmt: '/'.join(format(v, fmt) for v in stats[:, column].tolist())
    eta = f'{int(left // 3600)}h{int(left % 3600 // 60):02d}m' if left >= 3600 else f'{int(left // 60)}m{int(left % 60):02d}s'
    return (f'it {it:>7} | D_loss {join(0, ".3f")} | G_loss {join(1, ".3f")} | '
            f'D(x) {join(2, ".2f")} | D(G(z)) {join(3, ".2f")} | {rate:.0f} it/s, {eta} left')


def first_nonfinite(recent, first_it):
    """(iteration, pair) of the first non-finite loss in the recorded stats, or None."""
    bad = (~torch.isfinite(recent[:, :, :2])).any(2).nonzero()
    return None if len(bad) == 0 else (first_it + int(bad[0, 0]), int(bad[0, 1]) + 1)


def train(cfg):
    procs = Processes(cfg)
    try:
        status = run(cfg, procs)
    except RuntimeError as error:  # a collective failed: another process died or hung
        if procs.world == 1:
            raise
        procs.close(finished=False)
        sys.exit(f'parallel_gan.py: process {procs.rank} lost the other processes ({str(error).splitlines()[0]}); '
                 f'stopped. The last checkpoint in {cfg["out_dir"]} is intact.')
    procs.close(finished=True)
    return status


def run(cfg, procs):
    dev, dtype = procs.device, getattr(torch, cfg['dtype'])
    say = print if procs.leader else (lambda *args, **kwargs: None)
    if cfg['threads']:
        torch.set_num_threads(cfg['threads'])
    if procs.leader:
        os.makedirs(cfg['out_dir'], exist_ok=True)
    checkpoint_path = os.path.join(cfg['out_dir'], 'checkpoint.pt')
    state = load_checkpoint(checkpoint_path, cfg, dev) if cfg['resume'] else None

    # seeding: one seed, one stream per purpose; every process draws the same
    seed, P = cfg['seed'], cfg['n_pairs']
    torch.manual_seed(seed)
    images, labels = training_data(cfg)
    batches = Batches(images.to(dev), cfg['mb_size'], seed + 1)
    G_all, D_all = make_pairs(cfg, images.shape[1], dev, dtype)  # every pair (samples, evaluation, checkpoints)
    noise = torch.Generator(device=dev).manual_seed(seed + 2)
    real = images[:2000] if cfg['dataset'] in MIXTURES else None  # drawn under 2-D samples
    n_fixed = 16 if real is None else 1000  # the same latent points in every sample dump
    fixed_z = torch.randn(n_fixed, cfg['z_dim'], generator=torch.Generator().manual_seed(seed + 3)).to(dev, dtype)
    pairing = list(range(P))  # pairing[i]: which discriminator generator i trains against now
    history = torch.zeros(0, 1 + 4 * P, dtype=torch.float64)  # one row per log line: iteration, then each pair's mean stats
    recent = torch.zeros(cfg['log_every'], len(procs.slots), 4, device=dev, dtype=dtype)  # since the last log
    n_recent, start = 0, 0

    if state:
        for side, saved in ((G_all, state['G']), (D_all, state['D'])):
            side['model'].load_state_dict(saved['model'])
            side['solver'].load_state_dict(saved['solver'])
        noise.set_state(state['noise_rng'])
        batches.load_state_dict(state['batches'])
        pairing, history, start = state['pairing'], state['history'], state['iteration'] + 1
        n_recent = len(state['recent'])
        recent[:n_recent] = state['recent'][:, procs.slots]
        say(f'resumed from {checkpoint_path} after iteration {state["iteration"]}')
        if start >= cfg['iterations']:
            say(f'nothing to train: the run already reached --iterations={cfg["iterations"]}; raise it to go on')

    G, D = G_all, D_all  # the pairs this process trains: all of them, or its share under torchrun
    if procs.world > 1:
        G, D = (make_side(len(procs.slots), *side['model'].sizes(), cfg, dev, dtype) for side in (G_all, D_all))
        mine = lambda t: t[procs.slots.to(t.device)]
        copy_side(G_all, G, mine)
        copy_side(D_all, D, mine)
    for side in (G, D, G_all, D_all):
        for group in side['solver'].param_groups:
            group['lr'] = cfg['lr']  # a resumed run takes today's --lr

    def collect_all_pairs():
        """Bring G_all and D_all up to date from every process (all processes must call it)."""
        if procs.world > 1:
            copy_side(G, G_all, procs.gather)
            copy_side(D, D_all, procs.gather)

    def stop_if_nonfinite(stats, first_it):
        bad = first_nonfinite(stats, first_it)
        if bad:
            if procs.leader:
                save_losses(os.path.join(cfg['out_dir'], 'losses.png'), history, P, cfg['K'])
            sys.exit(f'parallel_gan.py: a loss of pair {bad[1]} became non-finite at iteration {bad[0]}; '
                     f'stopped. The last good checkpoint ({checkpoint_path}) is untouched.')

    # Ctrl-C (or torchrun's SIGTERM) finishes the current iteration, then saves; a second Ctrl-C stops at once.
    interrupted = []
    def on_interrupt(signum, frame):
        interrupted.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGINT, on_interrupt)
    signal.signal(signal.SIGTERM, on_interrupt)

    evaluator = Evaluator(cfg, dev, dtype, images, labels) if cfg['eval_every'] and procs.leader else None
    metrics_path = os.path.join(cfg['out_dir'], 'metrics.csv')
    if evaluator:  # a fresh run starts a fresh file; a resumed one redoes the evaluations after its checkpoint
        write_metrics(metrics_path, [], keep_until=start - 1)

    say(f'GAP: {P} pairs, K={cfg["K"]}, {len(images)} {cfg["dataset"]} training points, device {dev}, '
        f'{cfg["dtype"]}, {procs.world} process(es) x {torch.get_num_threads()} threads, '
        f'iterations {start}..{cfg["iterations"] - 1}', flush=True)
    last = cfg['iterations'] - 1
    clock, clock_it, stopping = time.perf_counter(), start, False
    for it in range(start, cfg['iterations']):
        recent[n_recent], partners = gap_iteration(it, G, D, batches, noise, cfg, procs)
        n_recent += 1
        if partners is not None:
            pairing = [pairing[j] for j in partners.tolist()]

        logging = it % cfg['log_every'] == 0 or it == last
        stopping = procs.anyone(interrupted) if logging or procs.world == 1 else False  # all processes agree
        if logging:
            stats = procs.gather(recent[:n_recent], dim=1)  # (iterations, every pair, 4)
            stop_if_nonfinite(stats, it - n_recent + 1)
            means = stats.mean(0).cpu().double()
            history = torch.cat([history, torch.cat([torch.tensor([it]), means.flatten()])[None]])
            now = time.perf_counter()
            rate = (it + 1 - clock_it) / max(now - clock, 1e-9)
            say(format_log(it, means, rate, (last - it) / max(rate, 1e-9)), flush=True)
            clock, clock_it, n_recent = now, it + 1, 0
        evaluating = cfg['eval_every'] and (it % cfg['eval_every'] == 0 and it > 0 or it == last)
        saving = it % cfg['sample_every'] == 0 or it == last or stopping
        if evaluating or saving:
            unlogged = procs.gather(recent[:n_recent], dim=1)
            stop_if_nonfinite(unlogged, it - n_recent + 1)
            collect_all_pairs()
        if evaluator and evaluating:  # before the checkpoint: a resume from an earlier one redoes it
            began = time.perf_counter()
            rows = evaluator(G_all, D_all, pairing, it)
            write_metrics(metrics_path, rows)
            save_metrics_plot(os.path.join(cfg['out_dir'], 'metrics.png'), read_metrics(metrics_path))
            say(format_eval(rows, len(rows[0]['histogram'])), flush=True)
            clock += time.perf_counter() - began  # evaluation time does not count against it/s
        if saving and procs.leader:
            number = it // cfg['sample_every'] + (it % cfg['sample_every'] != 0)
            samples = generate(G_all, fixed_z)[0]
            save_samples(os.path.join(cfg['out_dir'], f'{number:03d}.png'), samples, it, pairing, real)
            save_checkpoint(checkpoint_path, {
                'hyperparameters': cfg, 'iteration': it, 'pairing': pairing, 'history': history,
                'G': {k: v.state_dict() for k, v in G_all.items()}, 'D': {k: v.state_dict() for k, v in D_all.items()},
                'device': dev.type, 'noise_rng': noise.get_state(), 'batches': batches.state_dict(),
                'recent': unlogged.cpu()})
        if stopping:
            say(f'interrupted: checkpoint saved after iteration {it}; continue with --resume=True', flush=True)
            break
    if procs.leader:
        save_losses(os.path.join(cfg['out_dir'], 'losses.png'), history, P, cfg['K'])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return 130 if stopping else 0


if __name__ == '__main__':
    sys.exit(train(parse_args(sys.argv[1:])))
