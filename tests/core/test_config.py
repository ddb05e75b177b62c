import pytest

from captioner.core.config import PRESET_DIR, ConfigError, load_config, save_config


def test_defaults_yaml_then_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model: {d_model: 64, n_heads: 4}\ntrain: {lr: 0.01}\n")
    cfg = load_config(str(y), ["--train.lr=2e-3", "--model.encoder_kwargs={depth: 2}", "--data.tokenizer=bpe"])
    assert cfg.model.d_model == 64 and cfg.train.lr == 2e-3
    assert cfg.model.encoder_kwargs == {"depth": 2} and cfg.data.tokenizer == "bpe"
    assert cfg.train.epochs == 10  # dataclass default untouched


@pytest.mark.parametrize("override,needle", [
    ("--train.lrr=1", "unknown config key 'train.lrr'"),
    ("--nosection.x=1", "unknown config key 'nosection'"),
    ("--train.epochs=abc", "'train.epochs' expects an int"),
    ("--train.epochs=1.5", "'train.epochs' expects an int"),
    ("--train.compile=3", "'train.compile' expects a bool"),
    ("--model.encoder_kwargs=5", "'model.encoder_kwargs' expects a mapping"),
    ("--data.tokenizer=chars", "data.tokenizer must be"),
    ("--model.n_heads=7", "not divisible"),
    ("train.lr", "must look like"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_unknown_key_in_yaml(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("data: {sorce: x}\n")
    with pytest.raises(ConfigError, match="unknown config key 'data.sorce'"):
        load_config(str(y))


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
def test_presets_load_and_roundtrip(preset, tmp_path):
    cfg = load_config(preset)
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(str(tmp_path / "resolved.yaml"))
    assert again == cfg


def test_required_presets_exist():
    assert {"tiny-cpu", "seed-vit768", "vit-b16-a100"} <= {p.stem for p in PRESET_DIR.glob("*.yaml")}
    seed = load_config("seed-vit768")
    assert (seed.model.d_model, seed.model.n_layers, seed.model.n_heads, seed.model.max_len) == (768, 6, 8, 20)
    assert seed.model.encoder_kwargs["depth"] == 6 and not seed.model.pretrained
    a100 = load_config("vit-b16-a100")
    assert a100.model.encoder == "vit_base_patch16_224" and a100.model.pretrained


def test_config_imports_without_torch():
    """ModelConfig lives in core/config.py, so reading or validating a config never loads torch
    (`captioner web --help`, the pipeline compiler and ingest import it)."""
    import subprocess
    import sys

    code = "import sys, captioner.core.config\nassert 'torch' not in sys.modules, 'torch imported'\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
