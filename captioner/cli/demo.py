"""`captioner demo`: the main job end to end on generated data."""
from __future__ import annotations

from captioner.cli.args import POSITIVE, float_range, int_range


def cmd_demo(a, _):
    from captioner.demo import run_demo

    run_demo(a.workdir, images=a.images, epochs=a.epochs, min_cider=a.min_cider, serve=a.serve)


def add_demo(sub, common: dict) -> None:
    s = sub.add_parser("demo", **common, help="the main job end to end on generated data (what `make demo` runs)")
    s.add_argument("--workdir", default="demo_out", help="where the generated data, run and repository go")
    s.add_argument("--images", type=int_range(50), default=1500, help="generated images")
    s.add_argument("--epochs", type=POSITIVE, default=8, help="training epochs")
    s.add_argument("--min-cider", type=float_range(0.0), default=1.0, help="quality gate for the deploy step")
    s.add_argument("--serve", action="store_true",
                   help="then keep `captioner serve` and `captioner web` running on the demo's model until Ctrl-C")
    s.set_defaults(fn=cmd_demo)
