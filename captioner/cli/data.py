"""`captioner generate-data`, `ingest` and `verify`: datasets on disk and in object storage."""
from __future__ import annotations

import argparse
import json

from captioner.cli.args import COUNT_OR_ALL, FRACTION, POSITIVE, float_range, int_range

LAYOUT_NAMES = {"flickr30k": "Kaggle Flickr30k layout: results.csv + flickr30k_images/",
                "imagefolder": "image folder with a Hugging Face ImageFolder metadata.jsonl (file_name, text)",
                "csv": "captions.csv with an image,caption header + images/"}


def cmd_generate_data(a, _):
    from captioner.data.synthetic import generate

    out = generate(a.out, images=a.images, seed=a.seed, side=a.side, layout=a.layout)
    print(f"wrote {a.images} images and {a.images * 5} captions to {out} ({LAYOUT_NAMES[a.layout]})")


def _store(a, uri, create=False):
    from captioner.io.storage import open_store

    return open_store(uri, endpoint=a.s3_endpoint, secure=a.s3_secure, create=create)


def cmd_ingest(a, _):
    from captioner.data.ingest import IngestOptions, ingest

    o = IngestOptions(shard_mb=a.shard_mb, target_workers=a.target_workers, max_side=a.max_side, workers=a.workers,
                      val_fraction=a.val_fraction,
                      test_fraction=a.test_fraction, split_seed=a.split_seed, format=a.format, image_root=a.image_root,
                      strip_metadata=a.strip_metadata, progress=not a.no_progress)
    r = ingest(a.source, a.dest, o, store=_store(a, a.dest, create=True))
    print(json.dumps(r, indent=2))


def cmd_verify(a, _):
    from captioner.data.ingest import verify

    r = verify(a.dest, store=_store(a, a.dest), workers=a.workers)
    print(json.dumps(r, indent=2))
    if not r["ok"]:
        raise SystemExit(1)


def shard_mb(s: str):
    """argparse type of ingest --shard-mb: 'auto' or a number > 0."""
    if s.strip().lower() == "auto":
        return "auto"
    try:
        return float_range(0.0, lo_open=True)(s)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number > 0, got {s!r}") from None


def s3_flags(sp: argparse.ArgumentParser) -> None:
    g = sp.add_argument_group("object storage (s3:// URIs)")
    g.add_argument("--s3-endpoint", default=None,
                   help="host:port or http(s)://host:port (default: $CAPTIONER_S3_ENDPOINT); keys come from "
                        "$AWS_ACCESS_KEY_ID / $AWS_SECRET_ACCESS_KEY")
    g.add_argument("--s3-secure", action="store_true", default=None, help="use TLS (default: $CAPTIONER_S3_SECURE)")


def add_generate_data(sub, common: dict) -> None:
    s = sub.add_parser("generate-data", **common,
                       help="write a synthetic captioned image set (Kaggle Flickr30k layout, or --layout)")
    s.add_argument("out", help="output folder")
    s.add_argument("--images", type=POSITIVE, default=1000, help="number of images (5 captions each)")
    s.add_argument("--seed", type=int, default=0, help="random seed of the generator")
    s.add_argument("--side", type=int_range(16, 4096), default=128, help="image side in pixels")
    s.add_argument("--layout", choices=sorted(LAYOUT_NAMES), default="flickr30k",
                   help="; ".join(f"{k}: {v}" for k, v in sorted(LAYOUT_NAMES.items())))
    s.set_defaults(fn=cmd_generate_data)


def add_ingest(sub, common: dict) -> None:
    s = sub.add_parser("ingest", **common, help="validate, shard and upload a captioned image set to a folder or s3://",
                       description="SOURCE: a Kaggle Flickr30k folder or zip (results.csv + flickr30k_images/), an "
                                   "image folder with a metadata.jsonl (file_name, text: Hugging Face ImageFolder), "
                                   "a CSV with an image,caption header, a Karpathy split JSON or a COCO captions JSON "
                                   "(images next to it or --image-root). "
                                   "DEST: a folder or s3://bucket/prefix. Resumable: rerun after an interruption.")
    s.add_argument("source", help="captioned images: folder, zip, captions CSV/JSON or metadata.jsonl")
    s.add_argument("dest", help="a folder or s3://bucket/prefix")
    s.add_argument("--shard-mb", type=shard_mb, default=64.0,
                   help="target shard size in MB, or 'auto' with --target-workers: shards small enough that every "
                        "reader of the training cluster gets whole shards (each shard read once per epoch)")
    s.add_argument("--target-workers", type=int_range(1, 1_000_000), default=0, metavar="N",
                   help="with --shard-mb auto: readers of the cluster that will train on this data, i.e. ranks x "
                        "DataLoader workers per rank (e.g. 8 GPUs x --data.num_workers 4 = 32)")
    s.add_argument("--max-side", type=COUNT_OR_ALL, default=0,
                   help="resize images so the longer side is at most this (0 = keep)")
    s.add_argument("--workers", type=int_range(1, 256), default=8, help="parallel uploads / image checks")
    s.add_argument("--val-fraction", type=FRACTION, default=0.05, help="share of images held out for validation")
    s.add_argument("--test-fraction", type=FRACTION, default=0.05, help="share of images held out for testing")
    s.add_argument("--split-seed", type=int, default=0, help="seed of the image -> split hash")
    s.add_argument("--format", default="auto", choices=["auto", "flickr30k", "karpathy", "coco", "imagefolder", "csv"],
                   help="source layout (auto: detected from SOURCE)")
    s.add_argument("--image-root", default="", help="image folder for JSON sources")
    s.add_argument("--strip-metadata", action=argparse.BooleanOptionalAction, default=True,
                   help="drop EXIF (GPS, camera serials), XMP and comments from stored images, baking the EXIF "
                        "orientation into the pixels")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s3_flags(s)
    s.set_defaults(fn=cmd_ingest)


def add_verify(sub, common: dict) -> None:
    s = sub.add_parser("verify", **common, help="re-check a dataset's manifest against the store (sizes and sha256)")
    s.add_argument("dest", help="a dataset written by `captioner ingest`: folder or s3://bucket/prefix")
    s.add_argument("--workers", type=int_range(1, 256), default=8, help="parallel checks")
    s3_flags(s)
    s.set_defaults(fn=cmd_verify)
