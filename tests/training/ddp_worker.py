"""Run under torchrun by tests/training/test_train.py (`torchrun -m tests.training.ddp_worker DATA OUT [OVERRIDES...]`, from the
repository root), or as a plain process for one rank: train (default 4 steps), save this rank's weights, and write
the image ids of every micro-batch it trained on (None: a padding step) to OUT/rank{R}_batches.jsonl."""
import json
import os
import sys

import torch
import torch.distributed as dist

import captioner.training.train as train_mod
from tests.helpers import tiny_cfg

data, out, *extra = sys.argv[1:]
rank = int(os.environ.get("RANK", "0"))
real_step = train_mod._micro_step


def recording_step(r, batch, sync_now):
    """The trainer's own _micro_step, with a record of what it was given."""
    with open(f"{out}/rank{rank}_batches.jsonl", "a") as f:
        ids = None if batch is None else list(batch[3])
        f.write(json.dumps({"epoch": getattr(r.loader, "epoch", 0), "ids": ids}) + "\n")
    return real_step(r, batch, sync_now)


train_mod._micro_step = recording_step
cfg = tiny_cfg(data, out, "--train.max_steps=4", "--train.val_max_images=0", "--model.dropout=0.1", *extra)
res = train_mod.train(cfg, progress=False, resume="--resume" in os.environ.get("DDP_WORKER_FLAGS", ""))
torch.save({k: v.detach().cpu() for k, v in res.model.state_dict().items()}, f"{out}/rank{rank}_weights.pt")
world = dist.get_world_size() if dist.is_initialized() else 1
backend = dist.get_backend() if dist.is_initialized() else "none"
print(f"rank {rank} world {world} backend {backend} steps {res.step}", flush=True)
if dist.is_initialized():
    dist.destroy_process_group()
