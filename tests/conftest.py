import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A model small enough that a training step takes milliseconds on one CPU core.
TINY = [
    "--model.encoder=vit_tiny_patch16_224",
    "--model.encoder_kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}",
    "--model.d_model=32", "--model.n_layers=2", "--model.n_heads=2", "--model.max_len=16",
    "--data.num_workers=0", "--data.val_fraction=0.15", "--data.test_fraction=0.15",
    "--train.batch_size=8", "--train.warmup_steps=5", "--train.log_every=0", "--train.val_max_images=16",
    "--train.lr=2e-3",
]


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    from captioner.synthetic import generate

    d = tmp_path_factory.mktemp("synth")
    generate(d, images=80, seed=3, side=48, progress=False)
    return d


@pytest.fixture
def synth_copy(synth_dir, tmp_path) -> Path:
    """A private copy that a test may damage."""
    d = tmp_path / "data"
    shutil.copytree(synth_dir, d)
    return d


def tiny_cfg(data: Path, out: Path, *extra: str):
    from captioner.config import load_config

    return load_config(None, [*TINY, f"--data.source={data}", f"--train.out_dir={out}", *extra])


@pytest.fixture(scope="session")
def trained_run(synth_dir, tmp_path_factory):
    """One tiny trained run shared by the read-only tests (evaluate, caption, export...)."""
    from captioner.train import train

    out = tmp_path_factory.mktemp("run")
    res = train(tiny_cfg(synth_dir, out, "--train.epochs=3"), progress=False)
    return res


@pytest.fixture(scope="session")
def exported_repo(trained_run, tmp_path_factory):
    from captioner.export import export

    repo = tmp_path_factory.mktemp("repo") / "models"
    report = export(str(trained_run.out_dir / "ckpt_best.pt"), str(repo), device="cpu")
    return repo, report


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
