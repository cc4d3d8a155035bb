"""pyro_vae: a variational autoencoder on MNIST written as a Pyro model and guide."""

from .checkpoint import CheckpointError, load
from .config import Config
from .model import VAE, build_vae
from .trained import TrainedVAE

__all__ = ["Config", "VAE", "TrainedVAE", "CheckpointError", "build_vae", "load"]
