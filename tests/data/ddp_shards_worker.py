"""Run under torchrun by tests/data/test_ingest.py: stream two epochs of training shards through
DataLoader workers on each rank and report which items each rank saw."""
import json
import sys

import torch
import torch.distributed as dist

from captioner.core.preprocess import PreprocessConfig
from captioner.core.tokenizer import CaptionTokenizer
from captioner.data.manifest import open_shard_source
from captioner.data.shards import ShardStream

uri, out = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
store, manifest = open_shard_source(uri)
tok = CaptionTokenizer.train([c for it in manifest.items for c in it.captions])
pre = PreprocessConfig(input_size=(3, 16, 16))
ds = ShardStream(store, manifest, "train", tok, pre, 16, batch_size=5, rank=rank, world=world, seed=7,
                 shuffle_buffer=8, num_workers=2)
loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
epochs, batches = {}, ds.batches_per_rank()
for epoch in range(2):
    ds.set_epoch(epoch)
    ids = [i for b in loader for i in b[3]]
    gathered = [None] * world
    dist.all_gather_object(gathered, ids)
    epochs[str(epoch)] = gathered
all_batches = [None] * world
dist.all_gather_object(all_batches, batches)
if rank == 0:
    json.dump({"epochs": epochs, "batches": all_batches}, open(out, "w"))
dist.destroy_process_group()
