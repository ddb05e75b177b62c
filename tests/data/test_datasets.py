"""The torch side of raw-format data (`captioner.data.datasets`): the resumable DDP batch sampler."""
import pytest

from captioner.data.datasets import ResumableBatchSampler


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_shards_ranks_and_resumes(world):
    n, bs = 23, 4
    seen = []
    for rank in range(world):
        s = ResumableBatchSampler(n, bs, rank, world, seed=5)
        s.set_epoch(2)
        batches = list(s)
        assert len(batches) == len(s)
        seen += [i for b in batches for i in b]
        s.set_epoch(2, start_batch=2)
        assert list(s) == batches[2:]
    assert set(seen) == set(range(n)) and len(seen) - n < world  # only the padding repeats
