"""Run under torchrun by tests/test_train.py: train a few steps, save this rank's weights."""
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, sys.argv[1])
from helpers import tiny_cfg  # noqa: E402  (tests/helpers.py)

from captioner.train import train  # noqa: E402

data, out = sys.argv[2], sys.argv[3]
cfg = tiny_cfg(data, out, "--train.max_steps=4", "--train.val_max_images=0", "--model.dropout=0.1")
res = train(cfg, progress=False)
rank = dist.get_rank()
torch.save({k: v.detach().cpu() for k, v in res.model.state_dict().items()}, f"{out}/rank{rank}_weights.pt")
print(f"rank {rank} world {dist.get_world_size()} backend {dist.get_backend()} steps {res.step}", flush=True)
dist.destroy_process_group()
