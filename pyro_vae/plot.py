"""Figures: image grids, training curves, the latent space and the posterior; `python -m pyro_vae.plot RUN`.

Each picture of a run is a function that takes a run from `pyro_vae.load` (plus data) and returns a
matplotlib Figure, so notebooks show the same pictures the command line saves. Figures are built
without pyplot: no global state, nothing shown twice in a notebook, no backend needed to save them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from .checkpoint import METRICS_NAME, CheckpointError, load, run_directory
from .data import MNIST_TEST, NUM_CLASSES, DataError
from .datasets import load_data
from .evaluate import grid_posteriors, posterior_params
from .likelihoods import mean_or_draw
from .trained import lerp, slerp


def tile(images: torch.Tensor, nrow: int = 8, pad_value: float = 1.0, padding: int = 2) -> torch.Tensor:
    """Images (N, C, H, W) in [0, 1] as one (rows, cols) tensor (C = 1) or (rows, cols, C), nrow per row, with
    padding between them.

    The layout of torchvision's make_grid, written out here because importing torchvision imports
    torch._dynamo, which costs every command about 10 s on a 2-core machine.
    """
    images = images.detach().float().cpu().clamp(0, 1)
    n, c, h, w = images.shape
    cols, rows = min(nrow, n), math.ceil(n / nrow)
    grid = torch.full((c, rows * (h + padding) + padding, cols * (w + padding) + padding), float(pad_value))
    for i, image in enumerate(images):
        top, left = padding + (i // cols) * (h + padding), padding + (i % cols) * (w + padding)
        grid[:, top:top + h, left:left + w] = image
    return grid[0] if c == 1 else grid.permute(1, 2, 0)


def image_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> None:
    """Save images (N, C, H, W) in [0, 1] as one PNG grid (greyscale for C = 1, else RGB), nrow images per row."""
    from PIL import Image

    pixels = tile(images, nrow).mul(255).add(0.5).clamp(0, 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)  # (H, W) uint8: greyscale; (H, W, 3): RGB


def reconstruction_grid(originals: torch.Tensor, reconstructions: torch.Tensor, path: Path, nrow: int = 8) -> None:
    """Rows of originals, each followed by a row of their reconstructions."""
    rows = []
    for start in range(0, len(originals), nrow):
        rows += [originals[start:start + nrow], reconstructions[start:start + nrow]]
    image_grid(torch.cat(rows), path, nrow)


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl, one dict per epoch.

    A last line cut short by a kill is left out, with a note (`--resume` drops it too). Runs written before
    the training figure was named `train_objective` call it `train_elbo`; it is renamed here, since it was
    the weighted objective there too.
    """
    path = run_directory(run_dir) / METRICS_NAME
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if number < len(lines):
                raise CheckpointError(f"{path}: line {number} is not a metrics row; only the last line may be "
                                      "cut short (by a kill while it was written)") from None
            print(f"note: {path}: the last line was cut short (the run was killed while writing it); "
                  "reading the lines before it", file=sys.stderr)
    for row in rows:
        if "train_elbo" in row and "train_objective" not in row:
            row["train_objective"] = row.pop("train_elbo")
    return rows


def _figure(width: float, height: float):
    """A Figure not registered with pyplot: it is saved, or shown once as a notebook cell's value."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _grid_array(images: torch.Tensor, nrow: int):
    """Images (N, C, H, W) as one (H, W) (or, RGB, (H, W, 3)) array for imshow, with lines between them."""
    return tile(images, nrow, pad_value=0.2).numpy()  # for cmap="gray_r": black ink, white background, grey lines


def image_panels(panels: dict[str, torch.Tensor], nrow: int = 8, panel_width: float = 3.2):
    """Image grids side by side, one titled panel per entry: e.g. samples of several runs."""
    fig = _figure(panel_width * len(panels), panel_width * 1.1)
    for i, (title, images) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.imshow(_grid_array(images, nrow), cmap="gray_r")
        ax.set_axis_off()
        ax.set_title(title, fontsize=9)
    return fig


def image_table(grid: torch.Tensor, columns: list[str] | None = None, rows: list[str] | None = None,
                title: str = ""):
    """Images (R, C, channels, H, W) as one table of R rows and C columns, with optional column and row labels."""
    fig = _figure(0.8 * grid.shape[1] + 0.7, 0.8 * grid.shape[0] + 0.6)
    ax = fig.add_subplot()
    ax.imshow(_grid_array(grid.flatten(0, 1), grid.shape[1]), cmap="gray_r")
    height, width = grid.shape[-2:]  # images between 2-pixel lines
    ax.set_xticks([2 + width / 2 + (width + 2) * i for i in range(grid.shape[1])] if columns else [], columns or [])
    ax.set_yticks([2 + height / 2 + (height + 2) * i for i in range(grid.shape[0])] if rows else [], rows or [])
    ax.tick_params(length=0)
    ax.set_title(title, fontsize=9)
    return fig


def training_curves(run_dir: Path):
    """The training objective and the test ELBO per epoch, from the run's metrics file."""
    rows = read_metrics(run_dir)
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    epochs = [r["epoch"] for r in rows]
    ax.plot(epochs, [r["train_objective"] for r in rows], "o-", label="train objective")
    ax.plot(epochs, [r["test_elbo"] for r in rows], "s-", label="test ELBO")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per image")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def loss_curve(run_dir: Path, path: Path | None = None) -> Path:
    """Save the training curves as a PNG (default RUN/loss.png)."""
    path = Path(path or Path(run_dir) / "loss.png")
    training_curves(run_dir).savefig(path, dpi=100)
    return path


def samples_gif(run_dir: Path, path: Path | None = None, ms_per_frame: int = 500) -> Path:
    """An animated GIF of the per-epoch sample grids (RUN/images/samples_NNN.png), each frame labelled."""
    from PIL import Image, ImageDraw

    frames_in = sorted((Path(run_dir) / "images").glob("samples_*.png"))
    if not frames_in:
        raise FileNotFoundError(f"no sample grids under {Path(run_dir) / 'images'}")
    frames = []
    for file in frames_in:
        grid = Image.open(file).convert("RGB")
        frame = Image.new("RGB", (grid.width, grid.height + 16), "white")
        frame.paste(grid, (0, 16))
        ImageDraw.Draw(frame).text((4, 2), f"epoch {int(file.stem.split('_')[-1])}", fill="black")
        frames.append(frame)
    path = Path(path or Path(run_dir) / "samples.gif")
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=ms_per_frame, loop=0)
    return path


def _digit_colours(ax, points, labels, fig, **kwargs):
    """Scatter points (N, 2) coloured by digit label (class), with a colour bar of the classes."""
    classes = max(NUM_CLASSES, int(labels.max()) + 1) if len(labels) else NUM_CLASSES
    scatter = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10" if classes <= 10 else "tab20",
                         vmin=-0.5, vmax=classes - 0.5, **kwargs)
    bar = fig.colorbar(scatter, ax=ax, ticks=range(classes))
    bar.set_label("digit")
    return scatter


@torch.no_grad()
def latent_scatter(run, images: torch.Tensor, labels: torch.Tensor):
    """Posterior means of images coloured by digit: the latent plane in 2-D, its first two principal axes above."""
    loc, _ = posterior_params(run, images, labels)
    loc, labels = loc.double().cpu(), labels.cpu()
    fig = _figure(6.5, 5.5)
    ax = fig.add_subplot()
    if loc.shape[1] == 1:
        points = torch.stack([loc[:, 0], labels + 0.6 * (torch.rand(len(labels)) - 0.5)], -1)
        ax.set_xlabel("$z$")
        ax.set_ylabel("digit (jittered)")
    elif loc.shape[1] == 2:
        points = loc
        ax.set_xlabel("$z_0$")
        ax.set_ylabel("$z_1$")
        ax.set_aspect("equal")
    else:
        centred = loc - loc.mean(0)
        _, s, v = torch.linalg.svd(centred, full_matrices=False)
        points = centred @ v[:2].T
        share = (s ** 2 / (s ** 2).sum())[:2].tolist()
        ax.set_xlabel(f"principal axis 1 ({share[0]:.0%} of the variance)")
        ax.set_ylabel(f"principal axis 2 ({share[1]:.0%})")
    _digit_colours(ax, points.numpy(), labels.numpy(), fig, s=4, alpha=0.7, linewidths=0)
    ax.set_title(f"posterior means of {len(loc)} test digits"
                 + ("" if loc.shape[1] <= 2 else f" ({loc.shape[1]}-D, projected)"))
    return fig


def most_active_axes(run, images: torch.Tensor, labels: torch.Tensor | None = None, count: int = 2) -> list[int]:
    """The latent dimensions whose posterior means vary most over the images (the most active units)."""
    loc, _ = posterior_params(run, images, labels)
    return loc.var(0).argsort(descending=True)[:count].sort().values.tolist()


@torch.no_grad()
def latent_manifold(run, axes: tuple[int, int] = (0, 1), n: int = 15, span: float = 2.5):
    """Decoded images on an n x n grid of latent values in [-span, span] along two axes, the other dims at 0."""
    values = torch.linspace(-span, span, n)
    z = torch.zeros(n, n, run.config.latent_dim)
    z[..., axes[0]] = values[None, :]  # columns: axes[0] grows to the right
    z[..., axes[1]] = values.flip(0)[:, None]  # rows: axes[1] grows upwards
    images = run.decode(z.reshape(n * n, -1))
    fig = _figure(7, 7)
    ax = fig.add_subplot()
    half = span * n / (n - 1)  # each image is centred on its grid value
    ax.imshow(_grid_array(images, n), cmap="gray_r", extent=(-half, half, -half, half))
    ax.set_xlabel(f"$z_{{{axes[0]}}}$")
    ax.set_ylabel(f"$z_{{{axes[1]}}}$")
    others = "" if run.config.latent_dim == 2 else ", the other dimensions at 0"
    ax.set_title(f"decoded grid of latent values{others}")
    return fig


@torch.no_grad()
def interpolation(run, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 10, y_a=None, y_b=None):
    """Decoded images between the posterior means of two digits, along the line and along the arc."""
    loc, _ = posterior_params(run, torch.stack([x_a, x_b]),
                              None if y_a is None else torch.as_tensor([y_a, y_b]))
    t = torch.linspace(0, 1, steps, device=loc.device)
    fig = _figure(1.0 * (steps + 2), 2.8)
    for row, (name, path) in enumerate((("linear", lerp(loc[0], loc[1], t)),
                                        ("spherical", slerp(loc[0], loc[1], t)))):
        images = torch.cat([x_a[None].to(loc.device), run.decode(path), x_b[None].to(loc.device)])
        ax = fig.add_subplot(2, 1, row + 1)
        ax.imshow(_grid_array(images, steps + 2), cmap="gray_r")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name)
    fig.suptitle("interpolation between two test digits (ends: the originals)")
    return fig


DIGITS = [str(d) for d in range(NUM_CLASSES)]


def class_names(run) -> list[str]:
    """The labels of a run's classes as the pictures name them: 0, 1, ... (MNIST's digits)."""
    return [str(d) for d in range(run.config.classes())]


def digit_rows(run, per_row: int = 10):
    """Samples of a label-conditioned run, row d drawn given digit d: the per-epoch sample grid, labelled."""
    run.class_means()  # refuses an unconditional run, whose sample grid has no rows of digits
    images = run.sample_grid(per_row).unflatten(0, (run.config.classes(), per_row))
    return image_table(images, rows=class_names(run), title="samples given the digit: z ~ p(z | y), x ~ p(x | z, y)")


def styles_from_prior(run, n: int = 8):
    """Rows: n styles drawn from the prior, Normal(0, I); columns: each written as digit 0-9 (`TrainedVAE.restyle`)."""
    styles = torch.randn(n, run.config.latent_dim, device=run.device)
    return image_table(run.restyle(styles), columns=class_names(run),
                       title="one style per row, every digit: z = mu_y + style, style ~ Normal(0, I)")


def styles_from_digits(run, images: torch.Tensor, labels):
    """Rows: test digits, first the original, then its style (from q(z | x, y)) written as digit 0-9."""
    grid = torch.cat([images.to(run.device)[:, None], run.restyle(run.style_offsets(images, labels))], dim=1)
    return image_table(grid, columns=["x"] + class_names(run),
                       title="style of each test digit as every digit: z = mu_y + (E_q[z | x, y_x] - mu_y_x)")


def first_of_each_digit(labels: torch.Tensor) -> list[int]:
    """The index of the first image of each digit 0-9 (each class) present in labels."""
    return [int((labels == d).nonzero()[0]) for d in range(int(labels.max()) + 1) if (labels == d).any()]


@torch.no_grad()
def posterior_ellipses(run, images: torch.Tensor, labels: torch.Tensor, chosen: torch.Tensor,
                       draws: torch.Tensor | None = None, axes: tuple[int, int] = (0, 1)):
    """q(z | x) of the chosen images: means and 1- and 2-sigma ellipses over all posterior means; optional draws."""
    from matplotlib.patches import Ellipse

    loc, scale = posterior_params(run, images, labels)
    loc, scale, labels = loc[:, axes].cpu(), scale[:, axes].cpu(), labels.cpu()
    fig = _figure(7, 6)
    ax = fig.add_subplot()
    _digit_colours(ax, loc.numpy(), labels.numpy(), fig, s=3, alpha=0.25, linewidths=0)
    for i in chosen.tolist():
        (mx, my), (sx, sy) = loc[i].tolist(), scale[i].tolist()
        for k in (1, 2):
            ax.add_patch(Ellipse((mx, my), 2 * k * sx, 2 * k * sy, fill=False, lw=1.2, color="black"))
        ax.annotate(str(labels[i].item()), (mx, my), xytext=(4, 4), textcoords="offset points", fontsize=11,
                    weight="bold")
    if draws is not None:  # (S, len(chosen), latent_dim), e.g. from pyro.infer.Predictive
        d = draws[..., list(axes)].reshape(-1, 2).cpu()
        ax.scatter(d[:, 0], d[:, 1], s=2, color="black", alpha=0.5, label="draws from q(z|x)")
        ax.legend(loc="lower right")
    ax.set_xlabel(f"$z_{{{axes[0]}}}$")
    ax.set_ylabel(f"$z_{{{axes[1]}}}$")
    ax.set_aspect("equal")
    ax.set_title("q(z|x) of chosen digits: means and 1, 2 sigma ellipses")
    return fig


@torch.no_grad()
def posterior_reconstructions(run, images: torch.Tensor, draws: torch.Tensor, labels=None):
    """One row per image: the image, the decoded posterior mean, then decoded draws (S, B, latent_dim) of z."""
    loc, _ = posterior_params(run, images, labels)
    rows = [images.to(loc.device)[:, None], run.decode(loc)[:, None], run.decode(draws).transpose(0, 1)]
    grid = torch.cat(rows, dim=1)  # (B, 2 + S, 1, 28, 28)
    return image_table(grid, columns=["x", "mean"] + [f"z{i + 1}" for i in range(grid.shape[1] - 2)],
                       title="reconstructions: decoded posterior mean, then decoded draws z ~ q(z|x)")


@torch.no_grad()
def posterior_comparison(run, images: torch.Tensor, labels=None, grids: list | None = None, coarse: int = 81,
                         fine: int = 61, extent: float = 4.0):
    """For a 2-D latent: the true posterior p(z | x) on a grid (filled) against q(z | x) (lines), per image.

    grids: from `pyro_vae.evaluate.grid_posteriors` (computed here from coarse, fine, extent if not given).
    Both densities are drawn at the levels of a 2-D Gaussian's 1, 2 and 3 sigma (39%, 86%, 99% of its
    mass). Titles give log p(x) by quadrature and KL(q || p) on the grid: the ELBO is their difference.
    """
    if run.config.latent_dim != 2:
        raise ValueError(f"the grid posterior is drawn for 2-D latents, not {run.config.latent_dim}-D")
    if grids is None:
        images = images.to(run.device)
        y = labels.to(run.device) if labels is not None and getattr(run, "labels_observed", False) else None
        grids = grid_posteriors(run.vae, images, y, coarse=coarse, fine=fine, extent=extent)
    cols = min(len(grids), 5)
    rows = math.ceil(len(grids) / cols)
    fig = _figure(3.2 * cols, 3.2 * rows + 0.4)
    levels = (-torch.tensor([3.0, 2.0, 1.0]) ** 2 / 2).exp()  # density / peak density at 3, 2, 1 sigma
    for i, grid in enumerate(grids):
        ax = fig.add_subplot(rows, cols, i + 1)
        z0, z1 = (t.numpy() for t in torch.meshgrid(*grid.axes, indexing="ij"))
        p, q = grid.log_p.exp(), grid.log_q.exp()
        ax.contourf(z0, z1, p.numpy(), levels=(p.max() * torch.cat([levels, torch.ones(1)])).tolist(), cmap="Blues")
        ax.contour(z0, z1, q.numpy(), levels=(q.max() * levels).tolist(), colors="tab:red", linewidths=1.0)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
        ax.set_title(f"log p(x) {grid.log_px:.1f}, KL(q||p) {grid.kl:.2f}", fontsize=9)
        inset = ax.inset_axes([0.0, 0.78, 0.22, 0.22])
        inset.imshow(images[i, 0].cpu().numpy(), cmap="gray_r")
        inset.set_axis_off()
    fig.suptitle("true posterior p(z|x) on a grid (blue, filled) and the guide q(z|x) (red lines)")
    return fig


@torch.no_grad()
def hierarchy_samples(run, hold: str = "top", n: int = 8) -> torch.Tensor:
    """Samples (n, n, 1, 28, 28) of a hierarchical run (--layers 2+): each row holds one part of the story, each
    column redraws the other. hold="top": a row shares one z_L and every layer below is drawn afresh; hold="lower":
    a row shares the noise eps_l of every layer below (z_l = loc + scale * eps_l) and each column draws a new z_L.
    """
    from pyro import poutine
    from pyro.infer.reparam import LocScaleReparam

    sites = run.vae.sites
    if len(sites) < 2:
        raise ValueError("this run has one stochastic layer; train with --layers 2 or more")
    top = run.vae.prior().sample((n,))  # (n, width of z_L)
    if hold == "top":
        data = {sites[-1]: top[:, None].expand(n, n, -1)}
    else:  # the lower layers' standard-normal noise, one per row, and one z_L per column
        dims = run.config.layer_dims()
        data = {sites[-1]: top[None].expand(n, n, -1),
                **{f"{s}_decentered": torch.randn(n, 1, d, device=run.device).expand(n, n, d)
                   for s, d in zip(sites[:-1], dims)}}
    model = poutine.reparam(poutine.uncondition(run.vae.model),
                            config={s: LocScaleReparam(centered=0.0) for s in sites[:-1]})
    model = poutine.condition(model, data={k: v.reshape(n * n, -1) for k, v in data.items()})
    shape = run.config.shape()
    template = torch.zeros(n * n, *shape, device=run.device)  # only its shape is used
    return mean_or_draw(poutine.trace(model).get_trace(template).nodes["x"]["fn"]).reshape(n, n, *shape)


@torch.no_grad()
def draws_given_z(run, n: int = 8, draws: int = 8) -> torch.Tensor:
    """Images (n, draws, 1, 28, 28): row r holds draws of x ~ p(x | z_r) for one z_r ~ p(z) (of an unconditional run).

    What z carries is what the draws of a row share: with independent Bernoulli pixels only the pixel
    probabilities, with the autoregressive likelihood whole strokes, where each draw fills in its own details.
    """
    from pyro import poutine

    template = torch.zeros(n, *run.config.shape(), device=run.device)  # only its shape is used
    likelihood = poutine.trace(poutine.uncondition(run.vae.model)).get_trace(template).nodes["x"]["fn"]
    return likelihood.sample((draws,)).transpose(0, 1)


def what_z_carries(run, n: int = 8, draws: int = 8):
    """The picture of `draws_given_z`: one z per row, several draws of x given it."""
    return image_table(draws_given_z(run, n, draws), rows=[f"z{r + 1}" for r in range(n)],
                       title="each row: one z ~ p(z), then draws x ~ p(x | z)")


def layer_controls(run, n: int = 8):
    """What each layer of a hierarchical run controls: its top layer held along rows, then the layers below."""
    top, below = run.vae.sites[-1], ", ".join(run.vae.sites[:-1])
    return image_panels({f"each row one {top}; {below} redrawn": hierarchy_samples(run, "top", n).flatten(0, 1),
                         f"each row one noise of {below}; {top} redrawn":
                             hierarchy_samples(run, "lower", n).flatten(0, 1)}, nrow=n, panel_width=4.0)


EVERY_RUN = ("training_curves.png", "samples.gif", "latent_scatter.png")
HIERARCHICAL = ("layers.png",)
UNCONDITIONAL = ("manifold.png", "interpolation.png", "draws_given_z.png")
CONDITIONAL = ("digit_rows.png", "styles_from_prior.png", "styles_from_digits.png")
PICTURES = EVERY_RUN + UNCONDITIONAL
CONDITIONAL_PICTURES = EVERY_RUN + CONDITIONAL


NO_DOT = ("Pyro's diagrams of the model and guide are drawn by Graphviz's `dot` program, which is not installed "
          "here (apt-get install graphviz, or brew install graphviz)")


def program_graphs(run, x: torch.Tensor, y: torch.Tensor | None = None) -> dict:
    """pyro.render_model of the run's model and of its guide, run on images x (and labels y, where the model is
    told them): name -> graphviz.Digraph."""
    import pyro

    y = y if run.labels_observed else None
    return {name: pyro.render_model(program, model_args=(x, y), render_distributions=True)
            for name, program in (("model", run.model), ("guide", run.guide))}


def program_diagram(run, x: torch.Tensor, y: torch.Tensor | None = None):
    """The model and the guide as Pyro draws them (plate diagrams), side by side; None where Graphviz's `dot`
    program, which draws them, is missing (NO_DOT says so)."""
    import io
    import shutil

    from PIL import Image

    if shutil.which("dot") is None:
        return None
    pictures = {name: Image.open(io.BytesIO(graph.pipe(format="png")))
                for name, graph in program_graphs(run, x, y).items()}
    dpi = 96  # dot's PNGs: drawn at their own size
    width = sum(p.width for p in pictures.values()) / dpi + 0.5
    fig = _figure(width, max(p.height for p in pictures.values()) / dpi + 0.4)
    axes = fig.subplots(1, len(pictures), width_ratios=[p.width for p in pictures.values()])
    for ax, (name, picture) in zip(axes, pictures.items()):
        ax.imshow(picture)
        ax.set_title(name)
        ax.axis("off")
    return fig


def plot_run(run_dir: Path, out: Path | None = None, *, axes: tuple[int, int] | None = None, limit: int = 5000,
             pair: tuple[int, int] = (0, 1), styles: list[int] | None = None, device: str = "cpu",
             data_dir: str | None = None) -> list[Path]:
    """Save every picture of a run into out (default RUN/plots/); return their paths.

    styles: test indices whose style a label-conditioned run writes as every digit (default: the
    first test image of each digit).
    """
    run = load(run_dir, device=device)
    run_dir = run_directory(run_dir)
    out = Path(out or run_dir / "plots")
    out.mkdir(parents=True, exist_ok=True)
    config = run.config
    data = load_data(config, device=run.device, split="test", data_dir=data_dir)
    images, labels = data.test_images[:limit or None], data.test_labels[:limit or None]

    saved = []
    if (run_dir / METRICS_NAME).is_file():
        saved.append(_save(training_curves(run_dir), out / "training_curves.png"))
    if list((run_dir / "images").glob("samples_*.png")):
        saved.append(samples_gif(run_dir, out / "samples.gif"))
    saved.append(_save(latent_scatter(run, images, labels), out / "latent_scatter.png"))
    if config.conditional:  # decoding needs a label: the CVAE has pictures of its own
        chosen = list(styles or first_of_each_digit(data.test_labels))
        saved.append(_save(digit_rows(run), out / "digit_rows.png"))
        saved.append(_save(styles_from_prior(run), out / "styles_from_prior.png"))
        saved.append(_save(styles_from_digits(run, data.test_images[chosen], data.test_labels[chosen]),
                           out / "styles_from_digits.png"))
        return saved
    if config.latent_dim >= 2:
        axes = tuple(axes or most_active_axes(run, images, labels))
        saved.append(_save(latent_manifold(run, axes), out / "manifold.png"))
    if config.layers > 1:
        saved.append(_save(layer_controls(run), out / "layers.png"))
    a, b = pair
    saved.append(_save(interpolation(run, data.test_images[a], data.test_images[b], y_a=data.test_labels[a],
                                     y_b=data.test_labels[b]), out / "interpolation.png"))
    saved.append(_save(what_z_carries(run), out / "draws_given_z.png"))
    return saved


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    return path


def build_parser(prog: str = "python -m pyro_vae.plot") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Save the pictures of a trained run into RUN/plots/.",
        epilog=f"Pictures of every run: {', '.join(EVERY_RUN)}; of an unconditional run also "
               f"{', '.join(UNCONDITIONAL)} (draws of x given one z per row: what z carries); of a "
               "label-conditioned run (--conditional) instead "
               f"{', '.join(CONDITIONAL)}: samples with one row per digit, and styles (drawn from the prior, "
               "or of test digits) each written as every digit 0-9. A hierarchical run (--layers 2+) also has "
               f"{', '.join(HIERARCHICAL)}: samples with the top layer held along each row, then the layers below.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("run", help="run directory or checkpoint file")
    parser.add_argument("--out", default=None, help="folder for the pictures (default: RUN/plots)")
    parser.add_argument("--axes", type=int, nargs=2, default=None, metavar=("A", "B"),
                        help="latent dimensions of the manifold (default: the two most active)")
    parser.add_argument("--limit", type=int, default=5000, help="test digits in the latent scatter (0: all)")
    parser.add_argument("--pair", type=int, nargs=2, default=(0, 1), metavar=("I", "J"),
                        help="indices of the two test digits to interpolate between")
    parser.add_argument("--styles", type=int, nargs="+", default=None, metavar="I",
                        help="conditional runs: indices of the test digits whose style is written as every "
                             "digit (default: the first of each digit)")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--data-dir", default=None, help="where MNIST is unpacked (default: the run's --data-dir)")
    return parser


def main(argv=None, prog: str = "python -m pyro_vae.plot") -> int:
    import matplotlib

    matplotlib.use("Agg")  # files only; harmless where pyplot is never used
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        run = load(args.run)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    dim, size = run.config.latent_dim, run.config.test_size or MNIST_TEST
    if args.axes and not all(0 <= a < dim for a in args.axes) or args.axes and args.axes[0] == args.axes[1]:
        parser.error(f"--axes must be two different dimensions in 0..{dim - 1}, not {args.axes}")
    for flag, indices in (("--pair", args.pair), ("--styles", args.styles or [])):
        if not all(0 <= i < size for i in indices):
            parser.error(f"{flag} must be test indices in 0..{size - 1}, not {indices}")
    try:
        paths = plot_run(args.run, args.out, axes=args.axes, limit=args.limit, pair=tuple(args.pair),
                         styles=args.styles, device=args.device, data_dir=args.data_dir)
    except (CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
