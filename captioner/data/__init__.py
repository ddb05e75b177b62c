"""Datasets: readers of the raw forms (Flickr30k CSV, Karpathy and COCO JSON, image folders),
the shard manifest, ingest into tar shards, the shard stream training reads, synthetic data.
Imports core and io; the readers, the manifest and ingest never load torch."""
