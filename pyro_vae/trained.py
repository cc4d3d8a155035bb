"""A trained VAE to inspect (what `pyro_vae.load` returns): encode, decode, sample, reconstruct, classify.

Everything here computes tensors from a run; plot.py draws them and checkpoint.py reads the files.
"""

from __future__ import annotations

import torch
from pyro import poutine

from .config import Config
from .likelihoods import mean_or_draw
from .model import VAE


class TrainedVAE:
    """A trained VAE for inspection: the Pyro model and guide plus encode/decode/sample/reconstruct."""

    def __init__(self, vae: VAE, config: Config, state: dict | None = None):
        self.vae, self.config = vae.eval(), config
        self.epoch = (state or {}).get("epoch")
        self.device = next(vae.parameters()).device

    @property
    def model(self):
        return self.vae.model

    @property
    def guide(self):
        return self.vae.guide

    def _to(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else torch.as_tensor(t).to(self.device)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, y=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Loc and scale of the encoder's Gaussian q(z | x) (the IAF guide's base), each (B, latent_dim)."""
        x = self._to(x).reshape(-1, *self.config.shape())
        return self.vae.encoder(x, self.vae._one_hot(self._labels(y, len(x))))

    @torch.no_grad()
    def decode(self, z: torch.Tensor, y=None) -> torch.Tensor:
        """Mean of p(x | z) (p(x | z, y) for the CVAE), or a draw where it has none: images (..., C, H, W)."""
        z = self._to(z)
        y = self._labels(y, z.shape[0] if z.ndim > 1 else None)
        return mean_or_draw(self.vae.likelihood(self.vae.decoder(z, self.vae._one_hot(y))))

    @property
    def labels_observed(self) -> bool:
        """Whether the model is told each image's label (the fully supervised CVAE)."""
        return self.config.conditional and not self.config.labels

    def _labels(self, y, n: int | None = None) -> torch.Tensor | None:
        """Labels as a (B,) long tensor on the device; an int means that digit for all; None where unused."""
        if y is None or not self.config.conditional:
            return None
        y = torch.as_tensor(y, device=self.device, dtype=torch.long)
        return y.expand(n) if y.ndim == 0 and n is not None else y

    @torch.no_grad()
    def sample(self, n: int, y=None) -> torch.Tensor:
        """n images from the generative model: z from the prior (given digit y, for the CVAE), then E[x | z] (a draw
        of x where p(x | z) has no mean in closed form)."""
        template = torch.zeros(n, *self.config.shape(), device=self.device)  # only its shape is used
        y = self._labels(y, n)
        model = poutine.uncondition(self.vae.model)  # x (and y) are drawn, not observed ...
        if y is not None:
            model = poutine.condition(model, data={"y": y})  # ... except the digit asked for
        trace = poutine.trace(model).get_trace(template)
        return mean_or_draw(trace.nodes["x"]["fn"])

    def sample_grid(self, per_row: int = 8) -> torch.Tensor:
        """Samples for the per-epoch picture: 8 x 8, or for the CVAE one row per digit 0-9."""
        if self.config.conditional:
            classes = self.config.classes()
            return self.sample(classes * per_row, torch.arange(classes).repeat_interleave(per_row))
        return self.sample(per_row * per_row)

    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """The most probable digit under q(y | x), for the semi-supervised model: (B,)."""
        if self.vae.classifier is None:
            raise ValueError("this model has no classifier q(y | x); train with --conditional --labels N")
        return self.vae.classifier(self._to(x).reshape(-1, *self.config.shape())).argmax(-1)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y=None) -> torch.Tensor:
        """Decode the posterior mean of each image: (B, C, H, W); the CVAE uses labels y (or q(y | x))."""
        if self.config.conditional and y is None and self.vae.classifier is not None:
            y = self.classify(x)
        if self.vae.ladder:  # the ladder's q(z | z2, x) merges the encoder's Gaussian with p(z | z2): the guide's mean
            x = self._to(x).reshape(-1, *self.config.shape())
            return self.decode(poutine.trace(self.vae.guide).get_trace(x).nodes["z"]["fn"].mean)
        loc, _ = self.encode(x, y)
        return self.decode(loc, y)

    # The label-conditioned model (--conditional): a digit's style is its offset from the class mean.

    def class_means(self) -> torch.Tensor:
        """The means mu_y of a label-conditioned run's prior p(z | y) = Normal(mu_y, I): (10, latent_dim)."""
        if not self.config.conditional:
            raise ValueError("this needs a label-conditioned run (--conditional)")
        return self.vae.prior.class_means.detach()

    @torch.no_grad()
    def style_offsets(self, images: torch.Tensor, labels) -> torch.Tensor:
        """The style of each digit: its posterior mean under q(z | x, y), given its label y, minus mu_y; (B, D)."""
        labels = torch.as_tensor(labels, device=self.device)
        loc, _ = self.encode(images, labels)
        return loc - self.class_means()[labels]

    @torch.no_grad()
    def restyle(self, styles: torch.Tensor) -> torch.Tensor:
        """Each style (N, latent_dim) written as every digit: images (N, classes, C, H, W), decoded at z = mu_y + style.

        "The same z" for another digit means the same offset from the class mean, not the same raw z:
        under the prior z = mu_y + style with style ~ Normal(0, I) for every y, so a style keeps its
        place in each class's cloud, while a raw z taken to another class would sit off-centre in it.
        """
        z = self.class_means() + styles.to(self.device)[:, None]  # (N, 10, latent_dim)
        classes = self.config.classes()
        digits = torch.arange(classes, device=self.device).expand(len(styles), classes)
        return self.decode(z.flatten(0, 1), digits.flatten()).unflatten(0, (len(styles), classes))


# Paths between two latent points, for the interpolation picture


def lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Points (T, D) on the straight line from a to b at fractions t (T,)."""
    t = t[:, None]
    return (1 - t) * a + t * b


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Points (T, D) on the great-circle arc from a to b at fractions t (T,), norms interpolated linearly.

    Under a standard-normal prior most mass lies near a sphere; the straight line cuts inside it.
    """
    norm_a, norm_b = a.norm(), b.norm()
    cos = torch.dot(a / norm_a, b / norm_b).clamp(-1, 1)
    omega = torch.arccos(cos)
    if omega.abs() < 1e-4:  # (nearly) parallel: the arc is the line
        return lerp(a, b, t)
    t = t[:, None]
    direction = (torch.sin((1 - t) * omega) * a / norm_a + torch.sin(t * omega) * b / norm_b) / torch.sin(omega)
    return direction * ((1 - t) * norm_a + t * norm_b)
