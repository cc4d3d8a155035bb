#!/usr/bin/env python
"""Copy a run's checkpoint into pretrained/NAME without the optimizer and RNG state (what loading needs)."""
import sys, json
from pathlib import Path
import torch
src, name = Path(sys.argv[1]), sys.argv[2]
state = torch.load(src / "checkpoint.pt", map_location="cpu", weights_only=True)
dest = Path("pretrained") / name
dest.mkdir(parents=True, exist_ok=True)
state["config"]["out"] = str(dest)
keep = {k: state[k] for k in ("format", "config", "epoch", "step", "model", "best_test_elbo")}
torch.save(keep, dest / "checkpoint.pt")
(dest / "metrics.jsonl").write_text((src / "metrics.jsonl").read_text())
(dest / "config.json").write_text(json.dumps(state["config"], indent=2) + "\n")
print(dest, sum(p.numel() for p in keep["model"].values()), "numbers")
