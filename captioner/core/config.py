"""One strict configuration path: dataclass defaults -> YAML -> ``--section.key=value``.

Unknown keys and values of the wrong type are errors that name the key. The resolved
configuration is a plain dict (``to_dict``) that is written beside every output and
stored inside every checkpoint, so a run can always be reproduced from its artefacts.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from captioner.core.cost import DEFAULT_PRICE_PER_GPU_HOUR

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs"


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it."""


def setting(default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING):
    """A config key with what it means: `captioner train --help` lists every key with its
    default and the first sentence of `help`."""
    return field(default=default, default_factory=default_factory, metadata={"help": help})


@dataclass
class ModelConfig:
    encoder: str = setting("vit_base_patch16_224", "Any timm model name. ViTs give patch tokens; CNN feature maps are "
                           "flattened.")
    pretrained: bool = setting(False, "ImageNet weights help a lot on real photos; the Hub must be reachable or "
                               "`encoder_weights` must name a local file.")
    encoder_weights: str = setting("", "Local weights file (.safetensors/.pth/.bin) for the encoder; implies "
                                   "pretrained.")
    encoder_kwargs: dict = setting(default_factory=dict, help="Extra timm.create_model kwargs (img_size, patch_size, "
                                   "depth, embed_dim, ...).")
    freeze_encoder: bool = setting(False, "Freeze the encoder (linear-probe style) when data is tiny and weights are "
                                   "good.")
    d_model: int = setting(512, "Decoder width; 512 is the usual small captioner width, a tenth of the encoder FLOPs.")
    n_layers: int = 6
    n_heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = setting(0.1, "Captions are short and datasets small: dropout is the main regulariser.")
    max_len: int = setting(32, "Maximum caption length in tokens, BOS and EOS included (Flickr30k: 95% under 30 "
                           "words).")
    vocab_size: int = setting(0, 'Filled from the trained tokenizer; 0 means "not set yet".')
    pad_id: int = 0

    @property
    def max_new_tokens(self) -> int:
        """Longest caption the model was trained to produce: max_len minus BOS and EOS."""
        return self.max_len - 2


@dataclass
class DataConfig:
    source: str = setting("data/flickr30k", "Where the captioned images are: a Kaggle Flickr30k folder (results.csv + "
                          "flickr30k_images/), an image folder with a metadata.jsonl (file_name, text), a CSV with an "
                          "image,caption header, a Karpathy split JSON, a COCO captions JSON, or a shard manifest "
                          "written by `captioner ingest` (local path or s3:// URI).")
    image_root: str = setting("", "Image folder for JSON sources; empty = guess from the layout next to the JSON.")
    format: str = setting("auto", '"auto" detects the layout from `source`; else '
                          'flickr30k|karpathy|coco|imagefolder|csv.')
    val_fraction: float = setting(0.05, "Fractions of *images* (never caption rows) held out when the source has no "
                                  "split.")
    test_fraction: float = 0.05
    split_seed: int = setting(0, "Seed of the split hash: changing it reshuffles which images are held out.")
    tokenizer: str = setting("wordlevel", 'Tokenizer: "wordlevel" is exact and tiny for small vocabularies; "bpe" '
                             'copes with open vocabularies (real Flickr30k has ~18k word types, many seen once).')
    vocab_size: int = 10000
    min_word_freq: int = setting(1, "Words seen fewer times than this in training captions become [UNK] (wordlevel).")
    max_images: int = setting(0, "Cap on the number of images read (0 = all); useful for smoke runs on big sets.")
    num_workers: int = setting(2, "DataLoader workers per rank; 0 decodes images in the training process.")
    pin_memory: bool = True
    shuffle_buffer: int = setting(1000, "Shuffle buffer (items) when streaming tar shards.")


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    seed: int = 1337
    epochs: int = 10
    max_steps: int = setting(0, "Stop after this many optimizer steps (0 = run all epochs); the LR schedule uses it.")
    batch_size: int = setting(32, "Images per rank per micro-batch; every image brings all of its captions, so the "
                              "decoder sees batch_size * captions_per_image rows while the encoder runs once per "
                              "image.")
    grad_accum_steps: int = 1
    lr: float = 3e-4
    encoder_lr_scale: float = setting(1.0, "The encoder gets lr * encoder_lr_scale: pretrained encoders want a smaller "
                                      "step.")
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.98)
    warmup_steps: int = 100
    min_lr_ratio: float = setting(0.1, "Cosine decays to lr * min_lr_ratio rather than zero so late steps still learn.")
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    precision: str = setting("auto", '"auto" = bf16 autocast on CUDA, fp32 on CPU; "fp32" or "bf16" to force.')
    compile: bool = False
    ckpt_every: int = setting(0, "Checkpoint every N optimizer steps (0 = only at epoch ends and the end).")
    log_every: int = 10
    val_max_images: int = setting(200, "Validation (caption metrics) each epoch; 0 images = skip.")
    val_beam_size: int = 1
    best_metric: str = setting("CIDEr", "Caption metric used to keep the best checkpoint.")
    dist_backend: str = setting("auto", 'Backend for torch.distributed; "auto" = nccl on CUDA, gloo otherwise.')
    publish_uri: str = setting("", "The model store for this run: a folder or s3:// prefix. Every checkpoint is "
                               "mirrored here as it is written, `--resume` continues from here when out_dir has none "
                               "(a restarted pod), and the finished run is copied here. Empty = keep local.")
    run_id: str = setting("", "Which run the checkpoints belong to (the pipeline sets its KFP job id): --resume "
                          "refuses a checkpoint of another run instead of silently continuing it.")
    api: str = setting("auto", "The pipeline's cluster mode: which Kubeflow training API runs the job -- pytorchjob "
                       "(Training Operator v1.9), trainjob (Trainer v2.3 TrainJob) or auto (the one the cluster "
                       "serves, by API discovery; TrainJob when both are).")
    tensorboard: bool = setting(True, "TensorBoard events under out_dir/tb/ (rank 0): curves, held-out samples, "
                                "config.")
    price_per_gpu_hour: float = setting(DEFAULT_PRICE_PER_GPU_HOUR, 'For the "cost so far" curve and the run report: '
                                        'one GPU per rank.')


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check (and gently convert) `value` against the annotation `tp`; raise naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects an int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' expects a float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
    if tp is tuple or origin is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(value)
        raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
    if tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"config key '{key}' expects a mapping, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported type {_type_name(tp)}")


def _apply(obj: Any, values: dict, prefix: str = "") -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"unknown config key '{key}' (known: {', '.join(sorted(names))})")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            _apply(cur, v, key + ".")
        else:
            setattr(obj, k, _coerce(key, v, hints[k]))


def resolve_preset(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.exists():
        return p
    for cand in (PRESET_DIR / f"{name_or_path}.yaml", PRESET_DIR / name_or_path):
        if cand.exists():
            return cand
    presets = ", ".join(sorted(x.stem for x in PRESET_DIR.glob("*.yaml")))
    raise ConfigError(f"config '{name_or_path}' is neither a file nor a preset (presets: {presets})")


def parse_override(text: str) -> tuple[str, Any]:
    """``--train.lr=1e-3`` or ``train.lr=1e-3`` -> ("train.lr", 0.001). Values are YAML scalars."""
    t = text[2:] if text.startswith("--") else text
    if "=" not in t:
        raise ConfigError(f"override '{text}' must look like --section.key=value")
    k, v = t.split("=", 1)
    return k.strip(), yaml.safe_load(v) if v != "" else ""


def load_config(config: str | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    cfg = ExperimentConfig()
    if config:
        path = resolve_preset(config)
        data = yaml.safe_load(path.read_text()) or {}
        _apply(cfg, data)
    for ov in overrides or []:
        k, v = parse_override(ov)
        nested: dict = {}
        cur = nested
        parts = k.split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = v
        _apply(cfg, nested)
    validate(cfg)
    return cfg


def config_from_dict(d: dict) -> ExperimentConfig:
    cfg = ExperimentConfig()
    _apply(cfg, d)
    return cfg


def validate(cfg: ExperimentConfig) -> None:
    m, d, t = cfg.model, cfg.data, cfg.train
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}")
    if d.tokenizer not in ("wordlevel", "bpe"):
        raise ConfigError(f"data.tokenizer must be 'wordlevel' or 'bpe', got {d.tokenizer!r}")
    if t.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"train.precision must be auto|fp32|bf16, got {t.precision!r}")
    if not 0 <= d.val_fraction + d.test_fraction < 1:
        raise ConfigError("data.val_fraction + data.test_fraction must be in [0, 1)")
    if t.batch_size < 1 or t.grad_accum_steps < 1:
        raise ConfigError("train.batch_size and train.grad_accum_steps must be >= 1")


def save_config(cfg: ExperimentConfig | dict, path: str | Path) -> None:
    d = cfg.to_dict() if isinstance(cfg, ExperimentConfig) else cfg
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(_plain(d), sort_keys=False))


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
