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


def mlp(n_in, n_hidden, n_out):
    return nn.Sequential(nn.Linear(n_in, n_hidden), nn.ReLU(), nn.Linear(n_hidden, n_out))


class ReferenceGAP:
    """n_pairs generators G[i] (noise -> pixels) and discriminators D[i] (pixels -> logit)."""

    def __init__(self, n_pairs, z_dim, h_dim, x_dim, lr):
        self.G = [nn.Sequential(mlp(z_dim, h_dim, x_dim), nn.Sigmoid()) for _ in range(n_pairs)]
        self.D = [mlp(x_dim, h_dim, 1) for _ in range(n_pairs)]
        self.G_solver = [torch.optim.Adam(g.parameters(), lr=lr) for g in self.G]
        self.D_solver = [torch.optim.Adam(d.parameters(), lr=lr) for d in self.D]

    def copy_weights_from(self, G_stack, D_stack):
        """Take pair i's weights from slice i of parallel_gan.py's stacked networks."""
        with torch.no_grad():
            for nets, stack in ((self.G, G_stack), (self.D, D_stack)):
                for i, net in enumerate(nets):
                    body = net[0] if isinstance(net[0], nn.Sequential) else net
                    body[0].weight.copy_(stack.W1[i].T), body[0].bias.copy_(stack.b1[i, 0])
                    body[2].weight.copy_(stack.W2[i].T), body[2].bias.copy_(stack.b2[i, 0])
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
            D_loss = F.softplus(-D_real).mean() + F.softplus(D_fake).mean()
            D_loss.backward()
            self.D_solver[i].step()
            self.reset_grad()

            G_sample = self.G[i](z)
            G_loss = F.softplus(-self.D[i](G_sample)).mean()
            G_loss.backward()
            self.G_solver[i].step()
            self.reset_grad()
            losses.append(torch.stack([D_loss.detach(), G_loss.detach()]))
        return torch.stack(losses)

    def swap(self, partners):
        """Generator i gets the discriminator (and its solver) that was at partners[i]."""
        self.D = [self.D[j] for j in partners]
        self.D_solver = [self.D_solver[j] for j in partners]
