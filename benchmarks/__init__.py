"""Speed of pyro_vae against a hand-written PyTorch yardstick: `python benchmarks/bench.py`."""
