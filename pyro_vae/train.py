"""The SVI training loop; `python -m pyro_vae.train` is a thin shell over `train(config)`."""

from __future__ import annotations

import json
import sys
import time
import warnings
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI, RenyiELBO, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO
from tqdm.auto import tqdm

from . import plot
from .checkpoint import CHECKPOINT_NAME, TrainedVAE, save_checkpoint
from .config import Config, parse_args
from .data import DataError, load_mnist
from .evaluate import elbo_per_image
from .model import build_vae

NUM_RECONSTRUCTIONS_SHOWN = 32  # fixed test digits, shown above their reconstructions


class RunDirError(Exception):
    """The run directory cannot be used."""


def make_run_dir(config: Config) -> Path:
    out = Path(config.out or f"runs/{datetime.now():%Y%m%d-%H%M%S}").expanduser()
    if (out / CHECKPOINT_NAME).exists() or (out / "metrics.jsonl").exists():
        raise RunDirError(f"run directory {out} already holds a run; choose another --out")
    (out / "images").mkdir(parents=True, exist_ok=True)
    return out


@contextmanager
def _seeded(seed: int, device: torch.device):
    """Run a block on a fixed random stream without disturbing the training stream."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def make_elbo(config: Config):
    """The estimator config names; semi-supervised, Trace_ELBO becomes TraceEnum_ELBO to sum over unknown labels."""
    kwargs = dict(num_particles=config.num_particles, vectorize_particles=True, max_plate_nesting=1)
    if config.labels:
        # labelled batches observe y, so nothing is enumerated there; that is expected, not a mistake
        warnings.filterwarnings("ignore", message="TraceEnum_ELBO found no sample sites configured for enumeration")
        return TraceEnum_ELBO(**kwargs)
    return {"trace": lambda: Trace_ELBO(**kwargs),
            "meanfield": lambda: TraceMeanField_ELBO(**kwargs),
            "iwae": lambda: RenyiELBO(alpha=0.0, **kwargs)}[config.elbo]()


def kl_weight(config: Config, epochs_done: float) -> float:
    """beta, raised linearly from 0 over the warm-up epochs."""
    if config.kl_warmup_epochs == 0:
        return config.beta
    return config.beta * min(1.0, epochs_done / config.kl_warmup_epochs)


@torch.no_grad()
def test_figures(trained: TrainedVAE, data) -> dict:
    """Unweighted test ELBO (nats per image) and, for a model with a classifier, the accuracy of q(y | x)."""
    labels = data.test_labels if trained.labels_observed else None
    elbo = elbo_per_image(trained.vae, data.test_images, labels, batch_size=trained.config.eval_batch_size)
    figures = {"test_elbo": elbo.mean().item()}
    if trained.vae.classifier is not None:
        figures["test_accuracy"] = (trained.classify(data.test_images) == data.test_labels).float().mean().item()
    return figures


def train(config: Config) -> Path:
    """Train the VAE that config describes; return the run directory it wrote."""
    out = make_run_dir(config)
    config.out = str(out)
    print(f"pyro_vae: training in {out}\n{config.describe()}", flush=True)
    config.save(out / "config.json")

    device = torch.device(config.device)
    pyro.set_rng_seed(config.seed)
    data = load_mnist(config.data_dir, binarize=config.binarize, device=device, download=config.download,
                      train_size=config.train_size, test_size=config.test_size)
    if config.labels:
        data.keep_labels(config.labels, config.seed)
    vae = build_vae(config, num_data=data.num_train).to(device)
    trained = TrainedVAE(vae, config)

    pyro.clear_param_store()  # params of an earlier model in this process must not leak into this one
    optimizer = pyro.optim.Adam({"lr": config.lr})
    svi = SVI(vae.model, vae.guide, optimizer, loss=make_elbo(config))

    steps_per_epoch = data.steps_per_epoch(config.batch_size)
    shown = data.test_images[:NUM_RECONSTRUCTIONS_SHOWN]
    shown_labels = data.test_labels[:NUM_RECONSTRUCTIONS_SHOWN]
    step = 0
    for epoch in range(1, config.epochs + 1):
        vae.train()
        start, losses = time.perf_counter(), []
        bar = tqdm(data.epoch(config.batch_size), total=steps_per_epoch, desc=f"epoch {epoch}/{config.epochs}",
                   leave=False, disable=None)
        for i, (x, y) in enumerate(bar):
            vae.kl_weight = kl_weight(config, epoch - 1 + (i + 1) / steps_per_epoch)
            losses.append(svi.step(x, y))
            step += 1
            if i % 20 == 0:
                bar.set_postfix(elbo=f"{-sum(losses[-20:]) / len(losses[-20:]) / data.num_train:.2f}")
            if step == config.max_steps:
                break
        bar.close()
        seconds = time.perf_counter() - start
        vae.eval()

        with _seeded(config.seed, device):  # the same z for the test ELBO and pictures every epoch
            figures = test_figures(trained, data)
            plot.image_grid(trained.sample_grid(), out / "images" / f"samples_{epoch:03d}.png")
            plot.reconstruction_grid(shown, trained.reconstruct(shown, shown_labels),
                                     out / "images" / f"recon_{epoch:03d}.png")

        row = {"epoch": epoch, "step": step, "train_elbo": -sum(losses) / len(losses) / data.num_train, **figures,
               "seconds": seconds, "images_per_s": len(losses) * config.batch_size / seconds,
               "kl_weight": vae.kl_weight}
        accuracy = f"  accuracy {figures['test_accuracy']:.4f}" if "test_accuracy" in figures else ""
        print(f"epoch {epoch:3d}/{config.epochs}  train ELBO {row['train_elbo']:9.2f}  "
              f"test ELBO {figures['test_elbo']:9.2f}{accuracy}  {seconds:6.1f} s  "
              f"{row['images_per_s']:7.0f} img/s", flush=True)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        save_checkpoint(out / CHECKPOINT_NAME, {
            "config": config.to_dict(), "epoch": epoch, "step": step, "model": vae.state_dict(),
            "param_store": {name: p.detach() for name, p in pyro.get_param_store().items()},
            "optimizer": optimizer.get_state(), "rng": _rng_state(device), "metrics": row,
        })
        if step == config.max_steps:
            break
    plot.loss_curve(out)
    print(f"pyro_vae: done; load the run with pyro_vae.load({str(out)!r})", flush=True)
    return out


def main(argv=None) -> int:
    config = parse_args(argv)
    try:
        train(config)
    except (DataError, RunDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
