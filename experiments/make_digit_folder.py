"""Write MNIST training digits as a labelled PNG folder, digits/<class>/<i>.png (docs/own_data.md)."""

import sys
from pathlib import Path

from PIL import Image

from pyro_vae.data import load_mnist


def write_digit_folder(out: str | Path = "digits", count: int = 600, data_dir: str = "~/.cache/pyro_vae") -> Path:
    """The first `count` MNIST training digits as out/<class>/<i>.png (grey, 28 x 28); returns out."""
    data = load_mnist(data_dir, binarize="none", train_size=count, test_size=0)
    for i, (x, y) in enumerate(zip(data.train_images, data.train_labels)):
        folder = Path(out) / str(int(y))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((x[0] * 255).round().byte().numpy()).save(folder / f"{i}.png")
    return Path(out)


if __name__ == "__main__":  # python experiments/make_digit_folder.py [OUT [COUNT]]
    write_digit_folder(*(sys.argv[1:2] or ["digits"]), *map(int, sys.argv[2:3]))
