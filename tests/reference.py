"""The reference GAP loop written the plain way, to pin parallel_gan.py's behaviour.

One nn.Sequential and one Adam per network; for each pair in order, G runs twice (once
for the D step, once for the G step), D scores real and fake in separate passes, and
every network's gradients are zeroed after every step. The losses come from D's logits
in the same softplus form as parallel_gan.py, so the two can be compared to 1e-9 in
float64 (GAN training is chaotic: a formula difference of 1e-8 grows tenfold every
~50 iterations)."""
import torch
import torch.nn.functional as F
from torch import nn


def mlp(n_in, n_hidden, n_out, layers=1):
    sizes = [n_in] + [n_hidden] * layers
    hidden = [m for a, b in zip(sizes, sizes[1:]) for m in (nn.Linear(a, b), nn.ReLU())]
    return nn.Sequential(*hidden, nn.Linear(n_hidden, n_out))


def d_loss(real_logit, fake_logit):
    return F.softplus(-real_logit).mean() + F.softplus(fake_logit).mean()


def g_loss(fake_logit):
    return F.softplus(-fake_logit).mean()


class ReferenceGAP:
    """n_pairs generators G[i] (noise -> pixels) and discriminators D[i] (pixels -> logit)."""

    def __init__(self, n_pairs, z_dim, h_dim, x_dim, lr, layers=1, beta1=0.9, losses=(d_loss, g_loss)):
        self.G = [nn.Sequential(mlp(z_dim, h_dim, x_dim, layers), nn.Sigmoid()) for _ in range(n_pairs)]
        self.D = [mlp(x_dim, h_dim, 1, layers) for _ in range(n_pairs)]
        self.G_solver = [torch.optim.Adam(g.parameters(), lr=lr, betas=(beta1, 0.999)) for g in self.G]
        self.D_solver = [torch.optim.Adam(d.parameters(), lr=lr, betas=(beta1, 0.999)) for d in self.D]
        self.d_loss, self.g_loss = losses

    def copy_weights_from(self, G_stack, D_stack):
        """Take pair i's weights from slice i of parallel_gan.py's stacked networks."""
        with torch.no_grad():
            for nets, stack in ((self.G, G_stack), (self.D, D_stack)):
                for i, net in enumerate(nets):
                    body = net[0] if isinstance(net[0], nn.Sequential) else net
                    linears = [m for m in body if isinstance(m, nn.Linear)]
                    for linear, (W, b) in zip(linears, stack.layers(), strict=True):
                        linear.weight.copy_(W[i].T), linear.bias.copy_(b[i, 0])
        return self

    def to(self, *args):
        for net in self.G + self.D:
            net.to(*args)
        return self

    def reset_grad(self):
        for net in self.G + self.D:
            net.zero_grad()

    def iteration(self, z, x):
        """One iteration; returns (n_pairs, 2): each pair's D_loss and G_loss."""
        losses = []
        for i in range(len(self.G)):
            G_sample = self.G[i](z)
            D_real, D_fake = self.D[i](x), self.D[i](G_sample)
            D_loss = self.d_loss(D_real, D_fake)
            D_loss.backward()
            self.D_solver[i].step()
            self.reset_grad()

            G_sample = self.G[i](z)
            G_loss = self.g_loss(self.D[i](G_sample))
            G_loss.backward()
            self.G_solver[i].step()
            self.reset_grad()
            losses.append(torch.stack([D_loss.detach(), G_loss.detach()]))
        return torch.stack(losses)

    def swap(self, partners):
        """Generator i gets the discriminator (and its solver) that was at partners[i]."""
        self.D = [self.D[j] for j in partners]
        self.D_solver = [self.D_solver[j] for j in partners]
