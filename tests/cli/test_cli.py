"""A newcomer's first hour: each test runs the command a user typed and checks
what they should have seen. Commands run as real `python -m captioner` processes."""
import json
import re
import shutil
from pathlib import Path

import pytest

from tests.helpers import ROOT, run_cli


def _listing(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------- export --out never deletes data
@pytest.mark.parametrize("kind", ["training_run", "notes", "cwd"])
def test_export_refuses_a_folder_it_did_not_write(kind, trained_run, tmp_path):
    if kind == "training_run":  # a copy: the shared run must survive the old code too
        out = tmp_path / "run_copy"
        shutil.copytree(trained_run.out_dir, out)
    else:
        out = tmp_path / "notes"
        out.mkdir()
        (out / "notes.txt").write_text("my notes")
        (out / "sub").mkdir()
        (out / "sub" / "more.md").write_text("more")
    before = _listing(out)
    if kind == "cwd":
        r = run_cli("export", trained_run.out_dir / "ckpt_best.pt", "--out", ".", "--device", "cpu", cwd=out)
    else:
        r = run_cli("export", trained_run.out_dir / "ckpt_best.pt", "--out", out, "--device", "cpu")
    assert r.returncode != 0, r.stdout + r.stderr
    assert _listing(out) == before  # every file still there, unchanged
    assert "--force" in r.stderr and "not a model repository" in r.stderr
    assert "Traceback" not in r.stderr
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no staging left over


def test_export_replaces_its_own_repository_and_force_replaces_anything(trained_run, exported_repo, tmp_path):
    from captioner.serving.triton_repo import REPOSITORY_MARKER

    repo = tmp_path / "models"
    shutil.copytree(exported_repo[0], repo)
    assert (repo / REPOSITORY_MARKER).is_file()
    (repo / "stale.txt").write_text("from an old export")
    r = run_cli("export", trained_run.out_dir, "--out", repo, "--device", "cpu", "--no-verify", "--no-optimize")
    assert r.returncode == 0, r.stderr
    assert (repo / REPOSITORY_MARKER).is_file() and (repo / "captioner" / "config.pbtxt").is_file()
    assert not (repo / "stale.txt").exists()  # replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]  # nothing left beside it

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("x")
    r = run_cli("export", trained_run.out_dir, "--out", notes, "--device", "cpu", "--no-verify", "--no-optimize",
                "--force")
    assert r.returncode == 0, r.stderr
    assert not (notes / "notes.txt").exists() and (notes / REPOSITORY_MARKER).is_file()


# ----------------------------------------------------------------- ranges refused by the parser
@pytest.mark.parametrize("args, bad", [
    (["generate-data", "{out}", "--images", "-5"], "--images"),
    (["generate-data", "{out}", "--images", "0"], "--images"),
    (["generate-data", "{out}", "--side", "0"], "--side"),
    (["ingest", "src", "{out}", "--val-fraction", "1.5"], "--val-fraction"),
    (["ingest", "src", "{out}", "--test-fraction", "0"], "--test-fraction"),
    (["ingest", "src", "{out}", "--shard-mb", "-1"], "--shard-mb"),
    (["ingest", "src", "{out}", "--workers", "0"], "--workers"),
    (["pipeline", "run", "--host", "http://127.0.0.1:9", "--source", "src", "--workdir", "{out}",
      "--val-fraction", "nan"], "--val-fraction"),
    (["evaluate", "run", "--out", "{out}", "--max-images", "-1"], "--max-images"),
    (["caption", "x.jpg", "-c", "run", "--beam", "0"], "--beam"),
    (["caption", "x.jpg", "-c", "run", "--top-p", "5"], "--top-p"),
    (["caption", "x.jpg", "-c", "run", "--temperature", "0"], "--temperature"),
    (["caption", "x.jpg", "-c", "run", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["serve", "{out}", "--grpc-port", "70000"], "--grpc-port"),
])
def test_out_of_range_values_are_refused_by_the_parser(args, bad, tmp_path):
    out = tmp_path / "out"
    r = run_cli(*[a.format(out=out) for a in args])
    assert r.returncode == 2, r.stdout + r.stderr
    assert "usage:" in r.stderr and f"argument {bad}" in r.stderr and "expected" in r.stderr
    assert "wrote" not in r.stdout and not out.exists()


# ----------------------------------------------------------------- caption --url passes or refuses every option
@pytest.fixture(scope="module")
def served(exported_repo, tmp_path_factory):
    from tests.helpers import start_serve

    p, url = start_serve(exported_repo[0], tmp_path_factory.mktemp("serve") / "serve.log")
    yield url
    p.kill()
    p.wait()


def _images(synth_dir, n=3):
    return sorted((synth_dir / "flickr30k_images").glob("*.jpg"))[:n]


def _captions(r):
    assert r.returncode == 0, r.stderr
    return [line.split("\t", 1)[1] for line in r.stdout.splitlines()]


def test_caption_url_refuses_options_the_server_cannot_honour(served, synth_dir):
    r = run_cli("caption", *_images(synth_dir, 1), "--url", served, "--sample", "--temperature", "2.0",
                "--max-new-tokens", "3")
    assert r.returncode == 2 and r.stdout == ""
    assert "--sample" in r.stderr and "--temperature" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("opts", [["--max-new-tokens", "3"], ["--beam", "3"], ["--beam", "2", "--max-new-tokens", "4"]])
def test_caption_url_passes_beam_and_max_tokens_like_the_pytorch_path(opts, served, trained_run, synth_dir):
    imgs = _images(synth_dir)
    over_url = _captions(run_cli("caption", *imgs, "--url", served, *opts))
    local = _captions(run_cli("caption", *imgs, "-c", trained_run.out_dir, *opts))
    assert over_url == local
    if "--max-new-tokens" in opts:
        limit = int(opts[opts.index("--max-new-tokens") + 1])
        full = _captions(run_cli("caption", *imgs, "--url", served))
        assert all(len(c.split()) <= limit for c in over_url) and over_url != full


def test_caption_checkpoint_and_url_together_is_an_error(served, trained_run, synth_dir):
    r = run_cli("caption", *_images(synth_dir, 1), "-c", trained_run.out_dir, "--url", served)
    assert r.returncode == 2 and "not allowed with" in r.stderr and r.stdout == ""


# ----------------------------------------------------------------- one line and a hint, traceback with -v
MISTAKES = {
    "unknown_encoder": (["train", "--data.source={synth}", "--train.out_dir={tmp}/run", "--model.encoder=resnet_nope"],
                        "unknown timm encoder 'resnet_nope'"),
    "not_a_checkpoint": (["export", "{synth}/results.csv", "--out", "{tmp}/repo"], "not a captioner checkpoint"),
    "kubeflow_unreachable": (["pipeline", "run", "--host", "http://127.0.0.1:9", "--source", "s3://bkt/src",
                              "--data-uri", "s3://bkt/d", "--model-uri", "s3://bkt/m", "--repo-uri", "s3://bkt/r",
                              "--serving-uri", "s3://bkt/s"], "cannot reach Kubeflow Pipelines at http://127.0.0.1:9"),
    # no weights in an empty cache and a Hub that refuses connections (no network here either way)
    "weights_offline": (["train", "--config", "vit-b16-a100", "--data.source={synth}", "--train.out_dir={tmp}/run"],
                        "pretrained weights for 'vit_base_patch16_224' are not cached"),
}


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_common_mistakes_get_one_line_and_a_hint(mistake, verbose, synth_dir, tmp_path):
    args, message = MISTAKES[mistake]
    args = [a.format(synth=synth_dir, tmp=tmp_path) for a in args]
    env = {"HF_HUB_CACHE": str(tmp_path / "hf-cache"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    r = run_cli(*(["-v"] if verbose else []), *args, env=env)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "hint: " in r.stderr
    if verbose:
        assert "Traceback" in r.stderr
    else:
        assert "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 2, r.stderr  # the error and its hint
    assert not (tmp_path / "run").exists() and not (tmp_path / "repo").exists()


# ----------------------------------------------------------------- metrics.json and samples.html
@pytest.fixture(scope="module")
def shards(synth_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("shards") / "data"
    r = run_cli("ingest", synth_dir, d, "--val-fraction", "0.15", "--test-fraction", "0.15", "--no-progress")
    assert r.returncode == 0, r.stderr
    return d


@pytest.mark.parametrize("source", ["shards", "raw"])
def test_evaluate_reports_the_images_it_scored_and_a_worst_first_page(source, trained_run, synth_dir, shards,
                                                                      tmp_path):
    import json
    import re

    data = shards if source == "shards" else synth_dir
    out = tmp_path / "ev"
    r = run_cli("evaluate", trained_run.out_dir, "--data", data, "--out", out, "--beam", "2", "--no-meteor")
    assert r.returncode == 0, r.stderr
    assert "PTBTokenizer tokenized" not in r.stderr  # pycocoevalcap's Java chatter goes to the debug log
    m = json.loads((out / "metrics.json").read_text())
    n = len(json.loads((out / "captions.json").read_text()))
    assert n > 0 and m["images"] == n
    assert m["data"]["images"] == n and m["data"]["split"] == "test" and m["data"]["captions"] == 5 * n
    if source == "shards":
        manifest = json.loads((shards / "manifest.json").read_text())
        assert n == sum(it["split"] == "test" for it in manifest["items"])
    page = (out / "samples.html").read_text()
    scores = [float(x) for x in re.findall(r"<td class='score'>([0-9.]+)</td>", page)]
    assert len(scores) == n and f"All {n} evaluated images, worst CIDEr-D first" in page
    assert scores == sorted(scores)  # worst first
    assert sum(scores) / n == pytest.approx(m["metrics"]["CIDEr"], abs=2e-3)  # per-image CIDEr-D is the real one
    assert "beam search (beam 2, length penalty 1)" in page and "new tokens" in page


def test_samples_page_says_how_many_of_the_evaluated_images_it_shows(tmp_path):
    from captioner.core.decoding import DecodeParams
    from captioner.data.sources import ImageRecord
    from captioner.training.evaluate import samples_html

    recs = [ImageRecord(f"img{i}", str(tmp_path / f"{i}.jpg"), ["a cat"], "test") for i in range(5)]
    per_image = {f"img{i}": s for i, s in enumerate([0.9, 0.1, 2.0, 0.0, 0.5])}
    page = samples_html(recs, {r.image_id: "a cat" for r in recs}, {"CIDEr": 0.7}, "t", per_image,
                        DecodeParams(strategy="greedy", max_new_tokens=7), n=3)
    assert "Showing the 3 lowest-scoring of 5 evaluated images, worst CIDEr-D first" in page
    assert re.findall(r"<small>(img\d)</small>", page) == ["img3", "img1", "img4"]
    assert "greedy, at most 7 new tokens" in page


# ----------------------------------------------------------------- caption DIR, non-images skipped
@pytest.fixture
def mixed_folder(synth_dir, tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    for p in _images(synth_dir, 3):
        shutil.copy(p, d / p.name)
    shutil.copy(_images(synth_dir, 4)[3], d / "no_suffix")  # an image without an image suffix
    (d / "README.txt").write_text("holiday photos")
    (d / "notes.md").write_text("# notes")
    (d / "sub").mkdir()
    return d


@pytest.mark.parametrize("how", ["folder", "glob"])
def test_caption_expands_a_folder_and_skips_non_images(how, mixed_folder, trained_run):
    args = [mixed_folder] if how == "folder" else sorted(p for p in mixed_folder.iterdir())  # what `photos/*` gives
    r = run_cli("caption", *args, "-c", trained_run.out_dir)
    assert r.returncode == 0, r.stderr
    named = [line.split("\t")[0] for line in r.stdout.splitlines()]
    assert sorted(Path(n).name for n in named) == sorted(["no_suffix"] + [p.name for p in mixed_folder.glob("*.jpg")])
    assert all(line.split("\t")[1] for line in r.stdout.splitlines())
    assert "skipping" in r.stderr and "README.txt" in r.stderr and "notes.md" in r.stderr


def test_caption_with_nothing_but_non_images_is_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    r = run_cli("caption", tmp_path / "a.txt", "-c", tmp_path)
    assert r.returncode == 2 and "no image files" in r.stderr and r.stdout == ""


# ----------------------------------------------------------------- --help explains
def _subparsers(parser, path=()):
    import argparse

    yield path, parser
    for act in parser._actions:
        if isinstance(act, argparse._SubParsersAction):
            for name, sp in act.choices.items():
                yield from _subparsers(sp, path + (name,))


def _commands():
    from captioner.cli.main import build_parser

    return [path for path, _ in _subparsers(build_parser())]


@pytest.mark.parametrize("path", _commands(), ids=lambda p: " ".join(p) or "captioner")
def test_every_option_has_help_and_shows_its_default(path):
    import argparse

    from captioner.cli.main import build_parser

    parser = dict(_subparsers(build_parser()))[path]
    text = parser.format_help()
    for act in parser._actions:
        if isinstance(act, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        assert act.help, f"captioner {' '.join(path)}: {act.dest} has no help"
        shown = act.default not in (None, "", argparse.SUPPRESS) and act.default is not False
        if act.option_strings and shown:
            assert f"(default: {act.default})" in " ".join(text.split()), f"{act.dest} hides its default"
    usage = text.split("\n\n")[0]
    for internal in ("action", "what", "rest", "pipeline_cmd"):
        assert not re.search(rf"\b{internal}\b", usage), usage


def test_train_help_lists_presets_and_config_keys_from_the_dataclasses():
    import dataclasses

    from captioner.core.config import PRESET_DIR, ExperimentConfig

    r = run_cli("train", "--help")
    assert r.returncode == 0
    for preset in PRESET_DIR.glob("*.yaml"):
        assert f"  {preset.stem} " in r.stdout
    cfg = ExperimentConfig()
    for sec in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, sec.name)):
            assert f"{sec.name}.{f.name}=" in r.stdout
    assert "see config.py" not in r.stdout


def test_pipeline_compile_help_shows_only_its_own_flags():
    r = run_cli("pipeline", "compile", "--help")
    assert r.returncode == 0 and "OUT.yaml" in r.stdout
    for run_only in ("--host", "--source", "--min-cider", "--data-uri", "--train-mode"):
        assert run_only not in r.stdout
    assert "--host" in run_cli("pipeline", "run", "--help").stdout


def test_version():
    from captioner import __version__
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"captioner {__version__}"


@pytest.mark.parametrize("args", [["pipeline", "compile", "{out}", "--train.epochs=3"],
                                  ["generate-data", "{out}", "--train.epochs=3"],
                                  ["export", "ckpt.pt", "--out", "{out}", "--model.d_model=8"]])
def test_overrides_a_command_ignores_are_an_error(args, tmp_path):
    out = tmp_path / "out.yaml"
    r = run_cli(*[a.format(out=out) for a in args])
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr
    assert not out.exists()


# ----------------------------------------------------------------- quieter output
TINY_PIPELINE = ["--model.encoder=vit_tiny_patch16_224",
                 "--model.encoder_kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}",
                 "--model.d_model=32", "--model.n_layers=1", "--model.n_heads=2", "--model.max_len=16",
                 "--data.num_workers=0", "--train.epochs=1", "--train.batch_size=8", "--train.val_max_images=8"]


LOCAL_RUN = ["pipeline", "run", "--local", "--val-fraction", "0.15", "--test-fraction", "0.15", "--min-cider", "100",
             *TINY_PIPELINE]


@pytest.fixture(scope="module")
def local_pipeline(synth_dir, tmp_path_factory):
    """One local pipeline run (its quality gate set out of reach) shared by the checks below."""
    wd = tmp_path_factory.mktemp("local-pipeline") / "w"
    return wd, run_cli(*LOCAL_RUN, "--source", synth_dir, "--workdir", wd)


def test_pipeline_run_local_prints_one_line_per_step(local_pipeline):
    wd, r = local_pipeline
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout + r.stderr
    assert "\x1b[" not in out and "Executing task" not in out and "Streamed logs" not in out
    steps = {m.group(1): m.group(2) for m in re.finditer(r"^  (\w[\w-]*)\s+success\s+[\d.]+s  (.*)$", r.stdout, re.M)}
    assert {"ingest", "train", "evaluate", "export", "champion", "gate"} <= set(steps), r.stdout
    assert "items 80" in steps["ingest"] and "cider=" in steps["evaluate"] and "Output=False" in steps["gate"]
    assert len(out.splitlines()) < 15, out
    details = (wd / "pipeline.log").read_text()
    assert "Executing task" in details and "Fused" in details  # everything is kept, just not on the terminal
    # the HTML artifact has its .html name (pipeline output artifacts are written by the component)
    assert [p.suffix for p in (wd / "pipeline_root").rglob("evaluate/samples*")] == [".html"]


def test_local_pipeline_says_the_model_was_not_deployed_and_why(local_pipeline):
    wd, r = local_pipeline
    assert re.search(r"^not deployed: CIDEr-D [\d.e-]+ is below --min-cider 100$", r.stdout, re.M), r.stdout


def test_local_pipeline_writes_one_summary_and_the_report_next_to_it(local_pipeline):
    wd, r = local_pipeline
    s = json.loads((wd / "summary.json").read_text())
    assert f"results: {wd / 'summary.json'}" in r.stdout and str(wd / "samples.html") in r.stdout
    assert s["deploy"]["deployed"] is False and "below --min-cider 100" in s["deploy"]["reason"]
    assert set(s["metrics"]) >= {"CIDEr", "BLEU-4"} and s["evaluated_images"] > 0
    assert s["report"] == "samples.html" and "<table>" in (wd / "samples.html").read_text()
    assert s["export"]["parity"]["captions_equal"] >= 0 and s["dataset"]["items"] == 80
    assert s["model"]["checkpoint"] == "model/ckpt_best.pt" and s["export"]["repository"] == "model_repository"


def test_pipeline_log_keeps_step_output_without_colour_codes_dumps_or_repeated_warnings(local_pipeline):
    wd, _ = local_pipeline
    text = (wd / "pipeline.log").read_text()
    assert "\x1b[" not in text and "Got executor_input" not in text and '"outputFile"' not in text
    warnings = re.findall(r"^\S+\.py:\d+: \w*Warning: (.*)$", text, re.M)
    normalised = [re.sub(r"'[^']*'", "''", w) for w in warnings]
    assert warnings and len(normalised) == len(set(normalised)), warnings
    assert "ingest done: 80 items" in text and "checkpoint saved" in text


def test_rerunning_the_local_pipeline_is_refused_once_with_a_flag_that_exists(local_pipeline, synth_dir):
    """The second run in the same workdir: the train step refuses another run's checkpoints,
    once (no retries), and the hint's flag is one `pipeline run` takes."""
    wd, first = local_pipeline
    assert first.returncode == 0
    r = run_cli(*LOCAL_RUN, "--source", synth_dir, "--workdir", wd)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Retrying" not in r.stdout + r.stderr + (wd / "pipeline.log").read_text()
    assert re.findall(r"^  (train)\s+failure", r.stdout, re.M) == ["train"], r.stdout
    err = [ln for ln in r.stderr.splitlines() if " ERROR " in ln]
    assert "pipeline failed at step train: the model URI" in err[0] and "another pipeline run" in err[0], r.stderr
    assert "rerun with --overwrite" in err[1]
    assert "--overwrite" in run_cli("pipeline", "run", "--help").stdout


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_export_hides_onnxruntime_optimizer_internals(verbose, trained_run, tmp_path):
    r = run_cli(*(["-v"] if verbose else []), "export", trained_run.out_dir, "--out", tmp_path / "repo",
                "--device", "cpu", "--no-verify")
    assert r.returncode == 0, r.stderr
    internals = re.findall(r"^.*(?:fusion_base|onnx_model|fusion_utils).*$", r.stderr, re.M)
    assert bool(internals) == verbose
    assert "onnxruntime fusions:" in r.stderr  # our one-line summary stays


def test_progress_bar_and_log_lines_do_not_interleave(synth_dir, tmp_path):
    from tests.helpers import TINY

    r = run_cli("train", *TINY, f"--data.source={synth_dir}", f"--train.out_dir={tmp_path / 'run'}",
                "--train.epochs=2", "--train.log_every=1")
    assert r.returncode == 0, r.stderr
    segments = re.split(r"[\r\n]", r.stderr)
    assert any(s.startswith("train:") for s in segments), "no progress bar drawn"
    logs = [s for s in segments if re.search(r"\d\d:\d\d:\d\d (INFO|WARNING) ", s)]
    assert logs and all(re.match(r"\d\d:\d\d:\d\d ", s) for s in logs), [s for s in logs if not s[:1].isdigit()]


# ----------------------------------------------------------------- the README's laptop-to-cluster path
README = ROOT / "README.md"


def test_captioner_image_names_every_step(tmp_path):
    import yaml

    out = tmp_path / "p.yaml"
    r = run_cli("pipeline", "compile", out, env={"CAPTIONER_IMAGE": "registry.example.com/ml/captioner-trainer:9.9"})
    assert r.returncode == 0, r.stderr
    docs = list(yaml.safe_load_all(out.read_text()))
    executors = docs[0]["deploymentSpec"]["executors"]
    assert executors and {e["container"]["image"] for e in executors.values()} == \
        {"registry.example.com/ml/captioner-trainer:9.9"}


def test_readme_cost_table_matches_the_estimator():
    import yaml

    from captioner.core.cost import estimate_cost

    rows = re.findall(r"^\| `([\w-]+)` \| (\d+) \| (1 (?:GPU|A100)|2 workers × 8 [\w ()]+) \| ([\d.]+) h \| ([\d.]+) \| "
                      r"\$([\d.]+) \|$", README.read_text(), re.M)
    assert len(rows) == 4, rows
    for preset, epochs, hw, hours, gpu_hours, cost in rows:
        assert int(epochs) == yaml.safe_load((ROOT / "configs" / f"{preset}.yaml").read_text())["train"]["epochs"]
        gpus = 1 if hw.startswith("1 ") else 16
        e = estimate_cost(29000 * 5, int(epochs), 900.0, gpus, 3.0)
        assert (hours, gpu_hours, cost) == (f"{e.hours:.2f}", f"{e.gpu_hours:.1f}", f"{e.cost:.2f}"), preset


def test_readme_commands_are_valid_command_lines():
    import shlex

    from captioner.cli.main import build_parser

    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    lines = [ln.split("#")[0].strip() for b in blocks for ln in b.splitlines()]
    commands = [ln for ln in lines if ln.startswith("captioner ")]
    assert len(commands) >= 4
    for c in commands:
        parser = build_parser()
        try:
            a, extra = parser.parse_known_args(shlex.split(c)[1:])
        except SystemExit:
            raise AssertionError(f"README command does not parse: {c}") from None
        assert not extra or (getattr(a, "overrides_ok", False) and all(x.startswith("--") and "=" in x for x in extra)), c


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_replace_folder_swaps_in_the_new_repository(exchange, tmp_path, monkeypatch):
    from captioner.io import files
    if not exchange:
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    new, final = tmp_path / ".repo.new-1", tmp_path / "repo"
    new.mkdir()
    (new / "model.onnx").write_text("new")
    final.mkdir()
    (final / "model.onnx").write_text("old")
    files.replace_folder(new, final)
    assert (final / "model.onnx").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]
