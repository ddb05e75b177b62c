"""Run under torchrun by tests/test_train.py (`torchrun -m tests.ddp_worker`, from the repository root):
train a few steps, save this rank's weights."""
import sys

import torch
import torch.distributed as dist

from captioner.train import train
from tests.helpers import tiny_cfg

data, out = sys.argv[1], sys.argv[2]
cfg = tiny_cfg(data, out, "--train.max_steps=4", "--train.val_max_images=0", "--model.dropout=0.1")
res = train(cfg, progress=False)
rank = dist.get_rank()
torch.save({k: v.detach().cpu() for k, v in res.model.state_dict().items()}, f"{out}/rank{rank}_weights.pt")
print(f"rank {rank} world {dist.get_world_size()} backend {dist.get_backend()} steps {res.step}", flush=True)
dist.destroy_process_group()
