"""An independent digit classifier, to check that a CVAE's samples show the digit they were asked for.

A small conv net trained on the real MNIST training images (not on anything the VAE made), cached
under runs/experiments/ so the experiments share it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from pyro_vae.data import load_mnist

CACHE = Path("runs/experiments/digit_classifier.pt")


def _net(shape: tuple = (1, 28, 28), classes: int = 10) -> nn.Module:
    channels, height, width = shape
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, H/2, W/2)
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 64, H/4, W/4)
        nn.Flatten(), nn.Linear(64 * (height // 4) * (width // 4), 128), nn.ReLU(), nn.Linear(128, classes),
    )


@torch.enable_grad()  # also when called under no_grad, as sample_recognition does on first use
def train_classifier(data_dir: str = "~/.cache/pyro_vae", epochs: int = 2, device: str = "cpu",
                     seed: int = 0, train_size: int = 0, test_size: int = 0) -> tuple[nn.Module, float]:
    """Train on grey MNIST for a couple of epochs; return the net and its test accuracy (about 0.99)."""
    data = load_mnist(data_dir, binarize="none", device=device, train_size=train_size, test_size=test_size)
    return train_on(data, epochs, seed)


@torch.enable_grad()
def train_on(data, epochs: int = 2, seed: int = 0) -> tuple[nn.Module, float]:
    """Train on any labelled `data.MNIST` (grey values, any (C, H, W) and number of classes, e.g. your own folder
    from datasets.load_images); return the net and its accuracy on data's test images."""
    torch.manual_seed(seed)
    net = _net(data.image_shape, data.num_classes).to(data.train_images.device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(epochs):
        for idx in torch.randperm(data.num_train, device=data.train_images.device).split(128):
            loss = F.cross_entropy(net(data.train_images[idx]), data.train_labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(data.test_images).argmax(-1) == data.test_labels).float().mean().item()
    return net, accuracy


def classifier(device: str = "cpu") -> nn.Module:
    """The cached classifier, trained on first use."""
    net = _net()
    if CACHE.exists():
        net.load_state_dict(torch.load(CACHE, map_location="cpu", weights_only=True))
    else:
        net, accuracy = train_classifier()
        print(f"digit classifier: test accuracy {accuracy:.4f}")
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), CACHE)
    return net.to(device).eval()


@torch.no_grad()
def sample_recognition(run, per_digit: int = 100, seed: int = 0) -> float:
    """Fraction of a CVAE's samples (per_digit of each digit) that the classifier calls the digit asked for."""
    torch.manual_seed(seed)
    digits = torch.arange(10).repeat_interleave(per_digit)
    images = run.sample(len(digits), y=digits)  # (1000, 1, 28, 28), mean of p(x | z, y)
    predicted = classifier(str(images.device))(images).argmax(-1).cpu()
    return (predicted == digits).float().mean().item()
