"""Pictures: each figure shows what it claims (checked on the figure's own data), and the plot CLI writes them all."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import pyro_vae
from pyro_vae import Config
from pyro_vae import plot
from pyro_vae.data import load_mnist
from pyro_vae.train import train
from pyro_vae.trained import lerp, slerp


@pytest.fixture(scope="module")
def run_2d(tmp_path_factory, data_dir):
    """A 2-D latent run trained for two tiny epochs (two sample grids, two metrics rows)."""
    out = tmp_path_factory.mktemp("plot") / "run"
    config = Config(epochs=2, batch_size=64, train_size=128, test_size=64, latent_dim=2, arch="mlp", hidden_dim=32,
                    data_dir=str(data_dir), out=str(out), device="cpu")
    return train(config)


@pytest.fixture(scope="module")
def run_cvae(tmp_path_factory, data_dir):
    """A label-conditioned run with a 2-D latent, trained for one tiny epoch."""
    out = tmp_path_factory.mktemp("plot") / "cvae"
    config = Config(epochs=1, batch_size=64, train_size=128, test_size=64, latent_dim=2, arch="mlp", hidden_dim=32,
                    conditional=True, data_dir=str(data_dir), out=str(out), device="cpu")
    return train(config)


@pytest.fixture(scope="module")
def test_set(run_2d):
    config = pyro_vae.load(run_2d).config
    data = load_mnist(config.data_dir, binarize=config.binarize, train_size=1, test_size=config.test_size)
    return data.test_images, data.test_labels


def _cell(array, row, col):
    """The 28 x 28 image at (row, col) of a grid drawn by plot (2-pixel lines between images)."""
    return torch.as_tensor(array[2 + 30 * row:30 + 30 * row, 2 + 30 * col:30 + 30 * col])


def test_slerp_follows_the_arc_and_lerp_the_chord():
    a, b, t = torch.tensor([2.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0]), torch.linspace(0, 1, 5)
    arc, chord = slerp(a, b, t), lerp(a, b, t)
    for path in (arc, chord):
        assert torch.allclose(path[0], a) and torch.allclose(path[-1], b)
    assert torch.allclose(arc.norm(dim=1), torch.full((5,), 2.0))  # equal norms: stays on the sphere
    assert chord[2].norm() < 1.5  # the chord cuts inside it
    assert torch.allclose(arc[2], torch.tensor([2 ** 0.5, 2 ** 0.5, 0.0]))  # half the angle
    assert torch.allclose(slerp(a, 3 * a, t), lerp(a, 3 * a, t))  # parallel: the line
    c = torch.tensor([1.0, 1.0, 0.0])
    assert torch.allclose(slerp(a, c, t).norm(dim=1), torch.linspace(2, 2 ** 0.5, 5))  # norms interpolated


def test_latent_scatter_shows_posterior_means_in_2d_and_principal_axes_above(run_2d, test_set):
    run, (x, y) = pyro_vae.load(run_2d), test_set
    fig = plot.latent_scatter(run, x, y)
    points = torch.as_tensor(fig.axes[0].collections[0].get_offsets().data, dtype=torch.float32)
    loc, _ = run.encode(x)
    assert torch.allclose(points, loc, atol=1e-5)
    assert fig.axes[0].collections[0].get_array().tolist() == y.tolist()  # coloured by label

    wide = torch.cat([loc, loc[:, :1] * 0.1, torch.zeros(len(loc), 1)], 1)  # a 4-D cloud with 2-D structure
    run.encode = lambda images, labels=None: (wide, torch.ones_like(wide))
    run.config.latent_dim = 4
    fig = plot.latent_scatter(run, x, y)
    projected = torch.as_tensor(fig.axes[0].collections[0].get_offsets().data)
    centred = wide.double() - wide.double().mean(0)
    top = torch.linalg.svdvals(centred)[:2]
    assert torch.allclose(projected.norm(dim=0), top, rtol=1e-6)  # the two largest principal axes
    assert abs((projected[:, 0] * projected[:, 1]).sum()) < 1e-6 * top[0] ** 2  # uncorrelated
    assert "principal axis 1" in fig.axes[0].get_xlabel()


def test_manifold_cells_are_decoded_grid_values_in_the_right_place(run_2d):
    run = pyro_vae.load(run_2d)
    fig = plot.latent_manifold(run, axes=(0, 1), n=5, span=2.0)
    array = fig.axes[0].images[0].get_array()
    top_left = run.decode(torch.tensor([[-2.0, 2.0]]))[0, 0]  # z_0 grows to the right, z_1 upwards
    bottom_right = run.decode(torch.tensor([[2.0, -2.0]]))[0, 0]
    assert torch.allclose(_cell(array, 0, 0), top_left, atol=1e-6)
    assert torch.allclose(_cell(array, 4, 4), bottom_right, atol=1e-6)
    assert not torch.allclose(top_left, bottom_right, atol=1e-3)


def test_interpolation_rows_run_from_one_digit_to_the_other(run_2d, test_set):
    run, (x, _) = pyro_vae.load(run_2d), test_set
    fig = plot.interpolation(run, x[0], x[1], steps=5)
    linear, spherical = (ax.images[0].get_array() for ax in fig.axes[:2])
    loc, _ = run.encode(x[:2])
    for array in (linear, spherical):
        assert torch.equal(_cell(array, 0, 0), x[0, 0]) and torch.equal(_cell(array, 0, 6), x[1, 0])
        assert torch.allclose(_cell(array, 0, 1), run.decode(loc[:1])[0, 0], atol=1e-6)
    assert torch.allclose(_cell(linear, 0, 3), run.decode(loc.mean(0, keepdim=True))[0, 0], atol=1e-6)


def test_training_curves_and_gif_come_from_the_run_files(run_2d):
    rows = [json.loads(line) for line in (run_2d / "metrics.jsonl").read_text().splitlines()]
    fig = plot.training_curves(run_2d)
    train_line, test_line = fig.axes[0].get_lines()
    assert list(train_line.get_ydata()) == [r["train_objective"] for r in rows]
    assert list(test_line.get_ydata()) == [r["test_elbo"] for r in rows]
    assert train_line.get_label() == "train objective"

    gif = plot.samples_gif(run_2d, run_2d / "samples.gif")
    with Image.open(gif) as image:
        assert image.format == "GIF" and image.n_frames == 2
        grid = Image.open(run_2d / "images" / "samples_001.png")
        assert image.size == (grid.width, grid.height + 16)  # the grid under a label strip


def test_metrics_of_older_runs_with_train_elbo_still_read_and_plot(tmp_path):
    rows = [{"epoch": 1, "step": 4, "train_elbo": -200.0, "test_elbo": -190.0},
            {"epoch": 2, "step": 8, "train_elbo": -150.0, "test_elbo": -148.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r["train_objective"] for r in plot.read_metrics(tmp_path)] == [-200.0, -150.0]
    train_line, _ = plot.training_curves(tmp_path).axes[0].get_lines()
    assert list(train_line.get_ydata()) == [-200.0, -150.0]


def test_a_metrics_line_cut_by_a_kill_is_left_out_with_a_note(tmp_path, capsys):
    rows = [{"epoch": 1, "step": 4, "train_objective": -200.0, "test_elbo": -190.0},
            {"epoch": 2, "step": 8, "train_objective": -150.0, "test_elbo": -148.0}]
    whole = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "metrics.jsonl").write_text(whole[:-25])  # the kill came while epoch 2's line was written
    assert plot.read_metrics(tmp_path) == rows[:1]
    assert "the last line was cut short" in capsys.readouterr().err
    train_line, _ = plot.training_curves(tmp_path).axes[0].get_lines()
    assert list(train_line.get_ydata()) == [-200.0]

    (tmp_path / "metrics.jsonl").write_text("{not json\n" + whole)  # damage elsewhere is not a cut: an error
    with pytest.raises(pyro_vae.CheckpointError, match="line 1 is not a metrics row"):
        plot.read_metrics(tmp_path)


def test_posterior_pictures_draw_for_a_2d_run(run_2d, test_set):
    run, (x, y) = pyro_vae.load(run_2d), test_set
    fig = plot.posterior_comparison(run, x[:2], y[:2], coarse=21, fine=21)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 2 and all(t.startswith("log p(x)") for t in titles)
    draws = torch.randn(3, 2, 2)
    fig = plot.posterior_reconstructions(run, x[:2], draws)
    array = fig.axes[0].images[0].get_array()
    assert torch.allclose(_cell(array, 1, 4), run.decode(draws[2, 1])[0], atol=1e-6)  # row: image 1, column: draw 3
    fig = plot.posterior_ellipses(run, x, y, torch.tensor([0, 5]), draws=draws)
    assert len(fig.axes[0].patches) == 4  # 1- and 2-sigma ellipses of two digits
    with pytest.raises(ValueError, match="2-D"):
        run.config.latent_dim = 3
        plot.posterior_comparison(run, x[:1])


@pytest.mark.slow  # the CLI end to end: every picture
def test_plot_cli_writes_every_picture(run_2d, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_2d, run)
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text()[:-30])  # a kill cut the last line: the pictures are drawn all the same
    assert plot.main([str(run), "--out", str(tmp_path / "plots"), "--limit", "50"]) == 0
    captured = capsys.readouterr()
    assert "the last line was cut short" in captured.err and "Traceback" not in captured.err
    printed = captured.out.split()
    assert sorted(p.split("/")[-1] for p in printed) == sorted(plot.PICTURES)  # none of plot.CONDITIONAL
    for path in printed:
        with Image.open(path) as image:
            assert image.width > 100
    assert plot.main([str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no checkpoint") and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        plot.main([str(run_2d), "--axes", "0", "5"])
    assert exit_info.value.code == 2 and "--axes" in capsys.readouterr().err


def test_image_panels_show_each_set_under_its_title():
    a, b = torch.rand(4, 1, 28, 28), torch.rand(4, 1, 28, 28)
    fig = plot.image_panels({"first": a, "second": b}, nrow=2)
    assert [ax.get_title() for ax in fig.axes] == ["first", "second"]
    assert torch.allclose(_cell(fig.axes[1].images[0].get_array(), 1, 0), b[2, 0])


def _record_decoder_inputs(run):
    """Make run's decoder note the z and one-hot label of every call; return the list it appends to."""
    calls, decoder = [], run.vae.decoder
    forward = decoder.forward
    decoder.forward = lambda z, c=None: calls.append((z, c)) or forward(z, c)
    return calls


def test_digit_rows_are_the_per_epoch_sample_grid_one_row_per_digit(run_cvae, run_2d):
    run = pyro_vae.load(run_cvae)
    torch.manual_seed(1)
    fig = plot.digit_rows(run, per_row=3)
    torch.manual_seed(1)
    expected = run.sample_grid(3)  # (30, 1, 28, 28), digit d in places 3d .. 3d + 2
    array = fig.axes[0].images[0].get_array()
    assert array.shape == (2 + 30 * 10, 2 + 30 * 3)
    assert torch.allclose(_cell(array, 7, 2), expected[7 * 3 + 2, 0], atol=1e-6)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == plot.DIGITS
    with pytest.raises(ValueError, match="--conditional"):
        plot.digit_rows(pyro_vae.load(run_2d))


def test_styles_from_digits_keep_each_digits_offset_from_its_class_mean(run_cvae):
    run = pyro_vae.load(run_cvae)
    run.vae.prior.class_means.data = 3 * torch.randn(10, 2)  # well apart, so raw z and offset differ
    data = load_mnist(run.config.data_dir, binarize=run.config.binarize, train_size=1, test_size=64)
    x, y = data.test_images[:4], data.test_labels[:4]
    calls = _record_decoder_inputs(run)
    fig = plot.styles_from_digits(run, x, y)
    (z, one_hot), = calls  # one decoder pass for the whole table
    z, digits = z.reshape(4, 10, 2), one_hot.argmax(-1).reshape(4, 10)
    assert torch.equal(digits, torch.arange(10).expand(4, 10))  # column d is decoded as digit d
    loc, _ = run.encode(x, y)
    means = run.vae.prior.class_means.detach()
    offsets = z - means  # the same style in every column: the digit's own offset from its class mean
    assert torch.allclose(offsets, (loc - means[y])[:, None].expand(4, 10, 2), atol=1e-5)

    array = fig.axes[0].images[0].get_array()
    assert array.shape == (2 + 30 * 4, 2 + 30 * 11)
    reconstructions = run.decode(loc, y)
    for row in range(4):
        assert torch.equal(_cell(array, row, 0), x[row, 0])  # first column: the original
        # its own digit's column is its reconstruction: z = mu_y + (loc - mu_y) = loc
        assert torch.allclose(_cell(array, row, 1 + y[row].item()), reconstructions[row, 0], atol=1e-5)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["x"] + plot.DIGITS


def test_styles_from_prior_write_each_drawn_style_as_every_digit(run_cvae):
    run = pyro_vae.load(run_cvae)
    run.vae.prior.class_means.data = 3 * torch.randn(10, 2)
    calls = _record_decoder_inputs(run)
    torch.manual_seed(2)
    fig = plot.styles_from_prior(run, n=5)
    torch.manual_seed(2)
    styles = torch.randn(5, 2)
    (z, _), = calls
    assert torch.allclose(z.reshape(5, 10, 2), run.vae.prior.class_means.detach() + styles[:, None], atol=1e-6)
    array = fig.axes[0].images[0].get_array()
    assert array.shape == (2 + 30 * 5, 2 + 30 * 10)
    assert torch.allclose(_cell(array, 4, 9), run.decode(z[4 * 10 + 9], 9)[0], atol=1e-6)


@pytest.mark.slow  # the CLI end to end: every picture
def test_plot_cli_writes_the_cvae_pictures_for_a_conditional_run(run_cvae, tmp_path, capsys):
    assert plot.main([str(run_cvae), "--out", str(tmp_path / "plots"), "--styles", "3", "5", "8"]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(p.split("/")[-1] for p in printed) == sorted(plot.CONDITIONAL_PICTURES)
    with Image.open(tmp_path / "plots" / "styles_from_digits.png") as image:
        assert image.height < image.width / 2  # three rows of eleven
    paths = plot.plot_run(run_cvae, tmp_path / "default", limit=50)
    with Image.open(tmp_path / "default" / "styles_from_digits.png") as image:
        assert image.height > image.width / 2  # one row for each digit in the first 64 test images
    assert tmp_path / "default" / "digit_rows.png" in paths
    with pytest.raises(SystemExit) as exit_info:
        plot.main([str(run_cvae), "--styles", "64"])
    assert exit_info.value.code == 2 and "--styles" in capsys.readouterr().err


@pytest.mark.parametrize("n, nrow", [(2, 8), (8, 8), (10, 4), (64, 8)])  # make_grid leaves one image unpadded
def test_tile_lays_images_out_as_torchvision_make_grid(n, nrow):
    from torchvision.utils import make_grid

    images = torch.rand(n, 1, 28, 28)
    expected = make_grid(images, nrow=nrow, padding=2, pad_value=0.2)[0]
    assert torch.equal(plot.tile(images, nrow, pad_value=0.2), expected)


def test_saved_grid_has_the_pixels_of_the_images(tmp_path):
    images = torch.rand(3, 1, 28, 28)
    plot.image_grid(images, tmp_path / "g.png", nrow=2)
    pixels = torch.from_numpy(np.array(Image.open(tmp_path / "g.png"))).float()
    assert torch.allclose(pixels[2:30, 32:60] / 255, images[1, 0], atol=1 / 255)  # second image: top right
    assert (pixels[32:60, 32:60] == 255).all()  # no fourth image: padding colour


@pytest.mark.parametrize("settings, latents", [({}, ["z"]), ({"layers": 2}, ["z", "z2"]),
                                               ({"conditional": True}, ["z"])], ids=["vae", "hierarchy", "cvae"])
def test_the_program_graphs_are_pyros_plate_diagrams_of_model_and_guide(settings, latents):
    """pyro.render_model's graph (DOT text, no Graphviz program needed): every latent in the data plate of both,
    the observed x in the model's only, each with its distribution."""
    config = Config(latent_dim=2, arch="mlp", hidden_dim=8, layer_hidden_dim=8, device="cpu", **settings)
    run = pyro_vae.TrainedVAE(pyro_vae.build_vae(config), config)
    x, y = torch.zeros(3, 1, 28, 28), torch.zeros(3, dtype=torch.long)
    graphs = plot.program_graphs(run, x, y)
    model, guide = graphs["model"].source, graphs["guide"].source
    assert "subgraph cluster_data" in model and "subgraph cluster_data" in guide
    for name in latents:
        node = f"\t\t{name} [label={name} fillcolor=white"  # a latent: unshaded, inside the plate
        assert node in model and node in guide
    assert "x [label=x fillcolor=gray" in model and "x [label=x" not in guide  # observed: shaded, and only in p
    assert "x ~ Bernoulli" in model
    if config.conditional:  # the label, observed, in the model
        assert "y [label=y fillcolor=gray" in model


def test_without_graphvizs_dot_program_the_diagram_is_none(run_2d, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no dot on it
    assert plot.program_diagram(pyro_vae.load(run_2d), torch.zeros(2, 1, 28, 28)) is None
    assert "\n" not in plot.NO_DOT and "dot" in plot.NO_DOT


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot program is not installed")
def test_with_graphvizs_dot_program_the_diagram_shows_model_and_guide(run_2d):
    fig = plot.program_diagram(pyro_vae.load(run_2d), torch.zeros(2, 1, 28, 28))
    assert [ax.get_title() for ax in fig.axes] == ["model", "guide"]
    model, guide = (ax.images[0].get_array() for ax in fig.axes)
    assert model.shape[0] > guide.shape[0]  # the model's diagram is taller: z above x
