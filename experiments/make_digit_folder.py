"""Write 600 MNIST training digits as a labelled PNG folder, digits/<class>/<i>.png (docs/own_data.md)."""

from pathlib import Path

from PIL import Image

from pyro_vae.data import load_mnist

data = load_mnist("~/.cache/pyro_vae", binarize="none", train_size=600, test_size=0)
for i, (x, y) in enumerate(zip(data.train_images, data.train_labels)):
    folder = Path("digits") / str(int(y))
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray((x[0] * 255).round().byte().numpy()).save(folder / f"{i}.png")
