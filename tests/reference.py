"""The reference GAP loop written the plain way, to pin parallel_gan.py's behaviour.

One nn.Sequential and one Adam per network; for each pair in order, G makes its samples once
(as pytorch/examples' DCGAN does), D scores real and fake in separate passes (so batch norm
normalises each batch on its own), D steps, then G steps against the updated D; every network's
gradients are zeroed after every step. The paper's conditions are written plainly too: each pair's
own noise and batch (z and x with a leading pairs dimension), noise added to every D input, and
torch's clip_grad_norm_ on each network. PacGAN's packing (pack > 1) is a reshape of each batch into rows of
`pack` consecutive samples side by side before D; an R1 penalty (r1 > 0) is taken on each pair's own real inputs,
as a textbook loop over one GAN takes it. The losses come from D's logits in the same softplus form
as parallel_gan.py, so the two can be compared to 1e-9 in float64 (GAN training is chaotic: a
formula difference of 1e-8 grows tenfold every ~50 iterations)."""
import torch
import torch.nn.functional as F
from torch import nn


def mlp(n_in, n_hidden, n_out, layers=1, batch_norm=False):
    sizes = [n_in] + [n_hidden] * layers
    hidden = []
    for a, b in zip(sizes, sizes[1:]):
        hidden += [nn.Linear(a, b), *([nn.BatchNorm1d(b, track_running_stats=False)] if batch_norm else []), nn.ReLU()]
    return nn.Sequential(*hidden, nn.Linear(n_hidden, n_out))


def d_loss(real_logit, fake_logit):
    return F.softplus(-real_logit).mean() + F.softplus(fake_logit).mean()


def g_loss(fake_logit):
    return F.softplus(-fake_logit).mean()


class ReferenceGAP:
    """n_pairs generators G[i] (noise -> samples) and discriminators D[i] (samples -> logit)."""

    def __init__(self, n_pairs, z_dim, h_dim, x_dim, lr, layers=1, beta1=0.9, losses=(d_loss, g_loss),
                 batch_norm=False, output=nn.Sigmoid, clip=0.0, pack=1, r1=0.0):
        self.G = [nn.Sequential(mlp(z_dim, h_dim, x_dim, layers, batch_norm), output()) for _ in range(n_pairs)]
        self.D = [mlp(x_dim * pack, h_dim, 1, layers, batch_norm) for _ in range(n_pairs)]
        self.G_solver = [torch.optim.Adam(g.parameters(), lr=lr, betas=(beta1, 0.999)) for g in self.G]
        self.D_solver = [torch.optim.Adam(d.parameters(), lr=lr, betas=(beta1, 0.999)) for d in self.D]
        self.d_loss, self.g_loss = losses
        self.clip, self.pack, self.r1 = clip, pack, r1

    def judge(self, i, samples):
        """D[i]'s logits of samples (batch, x_dim), packed: one logit per `pack` consecutive samples."""
        return self.D[i](samples.reshape(-1, self.pack * samples.shape[-1]))

    def copy_weights_from(self, G_stack, D_stack):
        """Take pair i's weights from slice i of parallel_gan.py's networks (its Linear and BatchNorm layers,
        in order)."""
        with torch.no_grad():
            for nets, stack in ((self.G, G_stack), (self.D, D_stack)):
                ours = [m for m in stack if list(m.parameters(recurse=False))]
                for i, net in enumerate(nets):
                    theirs = [m for m in net.modules() if isinstance(m, (nn.Linear, nn.BatchNorm1d))]
                    for mine, layer in zip(theirs, ours, strict=True):
                        if isinstance(mine, nn.Linear):
                            mine.weight.copy_(layer.weight[i].T), mine.bias.copy_(layer.bias[i, 0])
                        else:
                            mine.weight.copy_(layer.weight[i, 0]), mine.bias.copy_(layer.bias[i, 0])
        return self

    def to(self, *args):
        for net in self.G + self.D:
            net.to(*args)
        return self

    def reset_grad(self):
        for net in self.G + self.D:
            net.zero_grad()

    def step(self, net, solver, loss):
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), self.clip)
        solver.step()
        self.reset_grad()

    def iteration(self, z, x, noise=(None, None, None)):
        """One iteration; z and x shared (batch, dim) or each pair's own (n_pairs, batch, dim); noise: each pair's
        noise on D's real, fake and G-step inputs (n_pairs, batch, x_dim), or None. Returns (n_pairs, 2): each
        pair's D_loss and G_loss."""
        own = lambda t, i: t[i] if t.dim() == 3 else t
        plus = lambda t, e, i: t if e is None else t + e[i]
        losses = []
        for i in range(len(self.G)):
            G_sample = self.G[i](own(z, i))
            real = plus(own(x, i), noise[0], i).detach().clone().requires_grad_(self.r1 > 0)
            D_real = self.judge(i, real)
            D_fake = self.judge(i, plus(G_sample.detach(), noise[1], i))
            D_loss = self.d_loss(D_real, D_fake)
            if self.r1:  # R1: r1/2 E|grad_x D(x)|^2 on this pair's real inputs
                grad, = torch.autograd.grad(D_real.sum(), real, create_graph=True)
                D_loss = D_loss + self.r1 / 2 * grad.square().sum(1).mean()
            self.step(self.D[i], self.D_solver[i], D_loss)

            G_loss = self.g_loss(self.judge(i, plus(G_sample, noise[2], i)))
            self.step(self.G[i], self.G_solver[i], G_loss)
            losses.append(torch.stack([D_loss.detach(), G_loss.detach()]))
        return torch.stack(losses)

    def swap(self, partners):
        """Generator i gets the discriminator (and its solver) that was at partners[i]."""
        self.D = [self.D[j] for j in partners]
        self.D_solver = [self.D_solver[j] for j in partners]
