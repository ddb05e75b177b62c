"""A newcomer's second hour: each check runs the command a user typed (a real
`python -m captioner` process) and checks what they should have seen; the new data forms go
through ingest, train and evaluate. The local pipeline's rerun, summary and log are checked in
tests/cli/test_cli.py, next to the one local pipeline run they share."""
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import TINY, free_port, pyproject, run_cli, stop_processes

# the tiny model, training only a step or two, no validation: commands that must get past setup
QUICK = [*TINY, "--train.val_max_images=0"]


def _one_error(r, *needles):
    """rc 2, no traceback, and an error line naming each needle (plus a hint line)."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if " ERROR " in ln]
    assert len(errors) == 2 and "hint: " in errors[1], r.stderr
    for n in needles:
        assert n in errors[0] + errors[1], (n, r.stderr)
    return errors


# ----------------------------------------------------------------- a permanent refusal is not retried
def _train_retry(cluster: bool, tmp_path):
    import yaml
    from kfp import compiler

    from captioner.pipeline.captioning import build_pipeline

    out = tmp_path / f"p-{cluster}.yaml"
    compiler.Compiler().compile(build_pipeline(cluster=cluster), str(out))
    spec = next(d for d in yaml.safe_load_all(out.read_text()) if "root" in d)
    return spec["root"]["dag"]["tasks"]["train"].get("retryPolicy")


def test_local_pipeline_does_not_retry_train_and_a_cluster_run_does(tmp_path):
    """kfp.local retries a failed task as the policy says (a refusal repeated twice, after 60 s
    and 120 s); on this machine a failure only repeats, on a cluster a pod may be preempted."""
    assert _train_retry(False, tmp_path) is None
    assert _train_retry(True, tmp_path)["maxRetryCount"] == 2


# ----------------------------------------------------------------- Ctrl-C during train
def test_ctrl_c_in_train_says_where_it_stopped_and_how_to_continue(synth_dir, tmp_path):
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "captioner", "train", *QUICK, f"--data.source={synth_dir}",
                          f"--train.out_dir={run}", "--train.max_steps=100000", "--no-progress"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = run / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert p.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        stop_processes(p)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    m = re.search(r"training interrupted at step (\d+)/100000; checkpoint saved in (\S+)", err)
    assert m and p.returncode == 130, err[-2000:]
    assert "rerun the same command with --resume" in err
    import torch

    assert torch.load(run / "ckpt_latest.pt", weights_only=True)["step"] == int(m.group(1)) > 0
    # 14: one process: no "[rank0]" on every log line
    assert " INFO captioner" in err and "[rank0]" not in err


# ----------------------------------------------------------------- resume with changed settings
def test_resume_with_other_settings_names_the_keys_in_one_line(trained_run, synth_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run.out_dir, run)
    before = (run / "ckpt_latest.pt").read_bytes()
    r = run_cli("train", *TINY, "--train.epochs=3", f"--data.source={synth_dir}", f"--train.out_dir={run}",
                "--resume", "--model.d_model=64", "--train.lr=5e-3")
    errors = _one_error(r, "model.d_model 32 -> 64", "train.lr 0.002 -> 0.005", "train.epochs")
    assert "size mismatch" not in r.stderr and len(errors[0]) < 400
    assert (run / "ckpt_latest.pt").read_bytes() == before



# ----------------------------------------------------------------- the serve extra covers HTTP, metrics and the page
def test_serve_only_venv_runs_http_metrics_and_the_web_page(lean_python, exported_repo, tmp_path, monkeypatch):
    """A venv with the base and the `serve` extra only (read from pyproject.toml): the page's and
    the HTTP/metrics front's modules import, and `captioner serve --http-port` answers."""
    import urllib.request

    from tests.helpers import source_on_path, start_serve

    http = free_port()
    source_on_path(monkeypatch)  # the lean venv imports this checkout's captioner
    r = subprocess.run([lean_python, "-c", "import captioner.web.gateway, captioner.serving.server.http, captioner.serving.server.metrics"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-500:]
    p, _ = start_serve(exported_repo[0], tmp_path / "lean.log", "--http-port", str(http), python=lean_python)
    try:
        assert urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=10).status == 200
    finally:
        p.terminate()
        p.wait(timeout=30)


def test_web_extra_is_the_gateway_s_dependencies():
    extras = pyproject()["optional-dependencies"]
    names = {re.split(r"[<>=\[ ]", r, maxsplit=1)[0] for r in extras["web"]}
    assert {"fastapi", "uvicorn", "python-multipart", "prometheus-client", "tritonclient", "grpcio"} <= names
    assert not names & {"torch", "onnxruntime", "timm"}
    assert set(extras["web"]) <= set(extras["serve"]) and set(extras["web"]) <= set(extras["serve-gpu"])


# ----------------------------------------------------------------- job render: only what the pods can read
@pytest.mark.parametrize("case", ["local_data", "local_model_uri", "local_yaml"])
def test_job_render_refuses_what_exists_only_on_this_machine(case, tmp_path):
    cfg = tmp_path / "my.yaml"
    cfg.write_text("train:\n  epochs: 2\n")
    args = {"local_data": ["--config", "tiny-cpu", "--data", "shards/synth", "--model-uri", "s3://models/r"],
            "local_model_uri": ["--config", "tiny-cpu", "--data", "s3://datasets/v1", "--model-uri", "runs/x"],
            "local_yaml": ["--config", str(cfg), "--data", "s3://datasets/v1", "--model-uri", "s3://models/r"]}[case]
    r = run_cli("job", "render", "--nodes", "1", "--gpus-per-node", "0", *args)
    needle = {"local_data": "--data 'shards/synth'", "local_model_uri": "--model-uri 'runs/x'",
              "local_yaml": "not a preset packaged in the trainer image"}[case]
    _one_error(r, needle)
    assert "kind:" not in r.stdout


# ----------------------------------------------------------------- the demo's closing hint serves, not retrains
def test_demo_closing_hint_serves_the_finished_model(exported_repo, tmp_path):
    import shlex

    from captioner.cli.main import build_parser

    code = f"from captioner.serving.stack import front_door; front_door({str(exported_repo[0])!r}, False)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    commands = [ln.strip() for ln in r.stdout.splitlines() if ln.strip().startswith("captioner ")]
    assert "demo" not in r.stdout and [c.split()[1] for c in commands] == ["serve", "web"], r.stdout
    serve = build_parser().parse_args(shlex.split(commands[0])[1:])
    assert Path(serve.repo) == exported_repo[0]
    web = build_parser().parse_args(shlex.split(commands[1])[1:])
    assert web.url == f"127.0.0.1:{serve.grpc_port}"


# ----------------------------------------------------------------- a run trained on a relative path, evaluated elsewhere
def test_a_run_trained_on_a_relative_path_evaluates_from_another_folder(synth_dir, tmp_path, monkeypatch):
    from captioner.training.train import train
    from tests.helpers import tiny_cfg

    here, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (here / "data").mkdir(parents=True)
    elsewhere.mkdir()
    shutil.copytree(synth_dir, here / "data" / "synth")
    monkeypatch.chdir(here)  # `captioner train --data.source=data/synth` typed in the project folder
    train(tiny_cfg(Path("data/synth"), Path("runs/r"), "--train.max_steps=1", "--train.val_max_images=0"),
          progress=False)
    monkeypatch.chdir(tmp_path)
    r = run_cli("evaluate", here / "runs" / "r", "--max-images", "3", "--no-meteor", cwd=elsewhere)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((here / "runs/r/eval_test_first3/metrics.json").read_text())["images"] == 3
    # the data moved: the hint says --data
    shutil.move(here / "data", tmp_path / "moved")
    r = run_cli("evaluate", here / "runs" / "r", "--max-images", "3", "--no-meteor", cwd=elsewhere)
    _one_error(r, "data source not found", "pass --data")


# ----------------------------------------------------------------- a first train in an empty folder
def test_first_train_in_an_empty_folder_suggests_generate_data_and_writes_nothing(tmp_path):
    r = run_cli("train", cwd=tmp_path)
    _one_error(r, "data source not found: data/synth", "captioner generate-data data/synth")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------- client connection errors: once, and what to do
@pytest.fixture(scope="module")
def http_only_port():
    """A plain HTTP/1.1 server: what Triton's HTTP port looks like to a gRPC client."""
    import http.server
    import threading

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()


def _images(synth_dir, n):
    return sorted((synth_dir / "flickr30k_images").glob("*.jpg"))[:n]


@pytest.mark.parametrize("case", ["down", "scheme", "http_port"])
def test_caption_url_connection_errors_are_one_line(case, synth_dir, http_only_port):
    url = {"down": f"127.0.0.1:{free_port()}", "scheme": "http://127.0.0.1:18001",
           "http_port": f"127.0.0.1:{http_only_port}"}[case]
    r = run_cli("caption", *_images(synth_dir, 5), "--url", url)
    needle = {"down": "cannot reach the model server", "scheme": "not a URL", "http_port": "an HTTP port?"}[case]
    _one_error(r, needle)
    assert r.stdout == "" and "jpg" not in r.stderr


def test_web_refuses_a_url_with_a_scheme_at_start():
    r = run_cli("web", "--url", "http://127.0.0.1:8001", "--port", str(free_port()), timeout=60)
    _one_error(r, "expected HOST:PORT", "--url 127.0.0.1:8001")


# ----------------------------------------------------------------- the split a run records is the one it used
def test_training_from_shards_records_the_dataset_split(synth_dir, tmp_path):
    data = tmp_path / "shards"
    r = run_cli("ingest", synth_dir, data, "--no-progress")  # ingest's defaults: 5% + 5%
    assert r.returncode == 0, r.stderr
    r = run_cli("train", *QUICK, f"--data.source={data}", f"--train.out_dir={tmp_path / 'run'}",
                "--train.max_steps=1", "--no-progress")  # TINY says 15% + 15%
    assert r.returncode == 0, r.stderr[-2000:]
    assert "split was fixed at ingest" in r.stderr and "data.val_fraction=0.15 (the dataset: 0.05)" in r.stderr
    import yaml

    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]
    assert (saved["val_fraction"], saved["test_fraction"]) == (0.05, 0.05)


def test_pipeline_run_splits_as_its_preset_says():
    """`pipeline run --help`: the split defaults come from the preset, not a second constant."""
    r = run_cli("pipeline", "run", "--help")
    assert "default: the --config preset's data.val_fraction" in " ".join(r.stdout.split())


# ----------------------------------------------------------------- evaluate: not a checkpoint; no silent overwrite
def test_evaluate_a_csv_gives_no_pickle_advice(synth_dir):
    r = run_cli("evaluate", synth_dir / "results.csv")
    _one_error(r, "not a captioner checkpoint")
    assert "weights_only` set to `False" not in r.stderr and "Re-running" not in r.stderr


def test_evaluate_with_other_decoding_keeps_the_first_result(trained_run, tmp_path):
    from captioner.training.evaluate import evaluate

    run = tmp_path / "run"
    shutil.copytree(trained_run.out_dir, run)
    evaluate(str(run), max_images=4, meteor=False)  # what `captioner evaluate RUN --max-images 4` writes
    first = (run / "eval_test_first4" / "metrics.json").read_text()
    r = run_cli("evaluate", run, "--max-images", "4", "--no-meteor", "--beam", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (run / "eval_test_first4" / "metrics.json").read_text() == first
    beam = json.loads((run / "eval_test_beam2_first4" / "metrics.json").read_text())
    assert (json.loads(first)["decode"]["strategy"], beam["decode"]["strategy"]) == ("greedy", "beam")


# ----------------------------------------------------------------- pipeline compile names the image it wrote
def test_pipeline_compile_says_which_image_every_step_runs(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CAPTIONER_IMAGE"}
    r = subprocess.run([sys.executable, "-m", "captioner", "pipeline", "compile", str(tmp_path / "p.yaml")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "CAPTIONER_IMAGE is not set" in r.stderr and "ghcr.io/captioner/trainer:0.1.0" in r.stdout


# ----------------------------------------------------------------- polish
def test_train_help_shows_whole_preset_sentences():
    r = run_cli("train", "--help")
    block = r.stdout.split("presets (--config NAME):")[1].split("config keys")[0]
    entries = re.split(r"\n  (?=\S)", block.strip())
    assert len(entries) >= 3 and all(" ".join(e.split()).endswith(".") for e in entries), block


def test_bench_help_names_the_command_it_belongs_to():
    r = run_cli("bench", "latency", "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: captioner bench latency"), r.stdout[:200]


def test_serve_a_dataset_folder_says_it_is_not_a_model_repository(synth_dir):
    r = run_cli("serve", synth_dir, "--grpc-port", str(free_port()), timeout=60)
    _one_error(r, "is not a model repository")
    assert "flickr30k_images/config.pbtxt" not in r.stderr


def test_generated_captions_use_an_before_a_vowel(tmp_path):
    r = run_cli("generate-data", tmp_path / "g", "--images", "60", "--side", "16")
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "g" / "results.csv").read_text()
    assert "orange" in text and not re.search(r"\b[Aa] orange", text)


# ----------------------------------------------------------------- your own data: ImageFolder metadata.jsonl, image,caption CSV
@pytest.mark.parametrize("layout", ["imagefolder", "csv"])
def test_own_data_forms_go_through_ingest_train_and_evaluate(layout, tmp_path):
    from captioner.data.ingest import IngestOptions, ingest
    from captioner.data.sources import read_records
    from captioner.training.evaluate import evaluate
    from captioner.training.train import train
    from tests.helpers import tiny_cfg

    src = tmp_path / "src"
    r = run_cli("generate-data", src, "--images", "40", "--side", "32", "--seed", "5", "--layout", layout)
    assert r.returncode == 0, r.stderr
    assert (src / {"imagefolder": "metadata.jsonl", "csv": "captions.csv"}[layout]).exists()
    recs, summary = read_records(src)
    assert len(recs) == 40 and all(len(x.captions) == 5 for x in recs) and not summary.skipped
    rep = ingest(str(src), str(tmp_path / "shards"), IngestOptions(val_fraction=0.2, test_fraction=0.2,
                                                                  progress=False))
    assert rep["items"] == 40
    for source in (src, tmp_path / "shards"):
        res = train(tiny_cfg(source, tmp_path / f"run-{source.name}", "--train.max_steps=2",
                             "--train.val_max_images=0"), progress=False)
        ev = evaluate(str(res.out_dir), max_images=4, meteor=False)
        assert len(ev["captions"]) == 4


def test_simple_forms_count_bad_rows_and_refuse_a_headerless_csv(tmp_path):
    from PIL import Image

    from captioner.data.sources import read_records

    for n in ("a.jpg", "b.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / n)
    (tmp_path / "metadata.jsonl").write_text(
        '{"file_name": "a.jpg", "text": "A red circle ."}\n'
        '{"file_name": "a.jpg", "text": ["A circle .", ""]}\n'   # a second line for the same image
        '{"file_name": "b.jpg", "text": "  "}\n'                   # no caption left
        '{"file_name": "../x.jpg", "text": "outside"}\n'
        'not json\n')
    recs, s = read_records(tmp_path)
    assert [(r.image_id, r.captions) for r in recs] == [("a.jpg", ["A red circle .", "A circle ."])]
    assert {k: len(v) for k, v in s.skipped.items()} == {"empty caption": 2, "image path outside the image folder": 1,
                                                        "malformed row": 1, "image without captions": 1}
    bad = tmp_path / "caps.csv"
    bad.write_text("a.jpg,A red circle .\n")
    with pytest.raises(ValueError, match="image and caption"):
        read_records(bad, "csv")
    good = tmp_path / "good.csv"
    with open(good, "w", newline="") as f:
        csv.writer(f).writerows([["image", "caption"], ["a.jpg", 'A "quoted", comma caption .'], ["b.jpg", "B ."]])
    recs, _ = read_records(good)
    assert [r.captions for r in recs] == [['A "quoted", comma caption .'], ["B ."]]


# ----------------------------------------------------------------- batch output, metrics with time and throughput, export report
def test_caption_output_file(trained_run, synth_dir, tmp_path):
    """--output FILE.jsonl through the command; .csv through the same entry point in process."""
    from captioner.cli.main import main

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    args = [*map(str, _images(synth_dir, 3)), str(bad), "-c", str(trained_run.out_dir), "--beam", "2", "--output"]
    r = run_cli("caption", *args, tmp_path / "caps.jsonl")
    assert r.returncode == 1 and r.stdout == "", r.stderr  # one image failed
    with pytest.raises(SystemExit) as e:
        main(["caption", *args, str(tmp_path / "caps.csv")])
    assert e.value.code == 1
    jsonl = [json.loads(ln) for ln in (tmp_path / "caps.jsonl").read_text().splitlines()]
    for rows in (jsonl, list(csv.DictReader((tmp_path / "caps.csv").open()))):
        assert len(rows) == 4 and {Path(x["image"]).name for x in rows} >= {"broken.jpg"}
        ok = [x for x in rows if not x["error"]]
        assert len(ok) == 3 and all(str(x["beam"]) == "2" and x["strategy"] == "beam" for x in ok)
        assert str(ok[0]["max_new_tokens"]) == str(trained_run.model.cfg.max_new_tokens)
    assert [x["caption"] for x in jsonl if not x["error"]] == \
        [x["caption"] for x in csv.DictReader((tmp_path / "caps.csv").open()) if not x["error"]]


def test_metrics_jsonl_has_time_and_throughput(trained_run):
    rows = [json.loads(ln) for ln in (trained_run.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows and all({"time", "images_per_s", "pairs_per_s"} <= set(x) for x in rows)
    assert all(x["images_per_s"] > 0 and x["pairs_per_s"] >= x["images_per_s"] for x in rows)
    assert rows[0]["time"] <= rows[-1]["time"] and rows[0]["time"].endswith("+00:00")


def test_export_report_is_portable_and_says_what_passed(exported_repo):
    import onnx

    from captioner.core.names import DECODE_LOOP

    repo, _ = exported_repo
    text = (repo / "export_report.json").read_text()
    rep = json.loads(text)
    assert str(repo) not in text and not re.search(r'"/(tmp|home|work)/', text)
    assert rep["parity"]["passed"] is True and rep["parity"]["tolerances"]["encoder_max_abs_diff"] > 0
    assert rep["versions"]["torch"] and rep["versions"]["onnxruntime"] and rep["versions"]["onnx"]
    assert set(rep["onnx"]) >= {"encoder", "decoder", DECODE_LOOP}
    m = onnx.load(str(repo / "encoder" / "1" / "model.onnx"), load_external_data=False)
    used = {n.domain or "ai.onnx" for n in m.graph.node}
    assert set(rep["onnx"]["encoder"]["opsets"]) == used
