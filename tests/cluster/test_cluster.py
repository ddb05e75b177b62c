"""Training on a real Kubeflow cluster, checked against the real systems' rules:
the Training Operator's pod environment (tests/cluster/operator_contract.py, from its v1.9 source)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captioner.cluster.jobs import training_job
from captioner.core.deployment import TRAINER_S3_SECRET
from tests.cluster.operator_contract import apply_defaults, operator_env, pod_env
from tests.helpers import ROOT, TINY, free_port, run_cli

FAKE_SECRETS = {TRAINER_S3_SECRET: {"endpoint": "127.0.0.1:9", "access-key": "k", "secret-key": "s"}}


def _job(data, store, **kw):
    ov = [*TINY, f"--data.source={data}", "--train.max_steps=3", "--train.val_max_images=0", "--model.dropout=0.1"]
    return training_job("captioner-train-contract", "tiny-cpu", ov, str(store), cloud="kind", cpu="1",
                        memory="2Gi", shm_size="256Mi", **{"workers": 2, "gpus_per_worker": 0, **kw})


def test_operator_env_for_an_elastic_worker_only_job(tmp_path):
    job = _job(tmp_path, tmp_path / "store")
    env = operator_env(job, "Worker", 1)
    # no Master replica: the operator sets no MASTER_ADDR / WORLD_SIZE / RANK at all
    assert not {"MASTER_ADDR", "WORLD_SIZE", "RANK"} & set(env)
    assert env["PET_NNODES"] == "2:2" and env["PET_NPROC_PER_NODE"] == "1" and env["PET_RDZV_BACKEND"] == "c10d"
    assert env["PET_RDZV_ENDPOINT"] == "captioner-train-contract-worker-0:23456"
    assert apply_defaults(job) == job, "the builder leaves nothing for the operator's defaulting to change"
    elastic = _job(tmp_path, tmp_path / "store", min_workers=1, max_workers=4, gpus_per_worker=8)
    env = operator_env(elastic, "Worker", 0)
    assert env["PET_NNODES"] == "1:4" and env["PET_NPROC_PER_NODE"] == "8" and env["PET_MAX_RESTARTS"] == "3"


def start_pods(cmd, envs, tmp_path, timeout=400):
    """Run one local process per pod: `cmd` with each env in `envs` (over this process's env,
    so PYTHONPATH and the venv stay), each in its own working folder; wait for all of them
    (killing all on a timeout) and return [(returncode, log text)]."""
    base = {**os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    procs = []
    for i, env in enumerate(envs):
        wd = tmp_path / f"pod{i}"
        wd.mkdir()
        log = open(tmp_path / f"pod{i}.log", "w")
        procs.append((subprocess.Popen(cmd, cwd=wd, env={**base, **env}, stdout=log, stderr=subprocess.STDOUT),
                      tmp_path / f"pod{i}.log"))
    out = []
    for p, logf in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q, _ in procs:
                q.kill()
            raise
        out.append((p.returncode, logf.read_text()))
    return out


def run_pods(job, tmp_path, secrets=FAKE_SECRETS, timeout=400):
    """Start every Worker replica's container command as a local process with the env the
    v1.9 operator + kubelet give it. Differences from a cluster, and why they keep the
    contract: the headless Service name <job>-worker-0 resolves to pod 0, here every pod is
    127.0.0.1 (same c10d store host); the rendezvous port is a free one instead of 23456
    (tests run in parallel); each pod's workingDir is its own folder."""
    ws = job["spec"]["pytorchReplicaSpecs"]["Worker"]
    c = next(c for c in ws["template"]["spec"]["containers"] if c["name"] == "pytorch")
    port, envs = free_port(), []
    for i in range(ws["replicas"]):
        env = pod_env(job, "Worker", i, secrets)
        host = env["PET_RDZV_ENDPOINT"].rsplit(":", 1)[0]
        assert host == f"{job['metadata']['name']}-worker-0"
        env["PET_RDZV_ENDPOINT"] = f"127.0.0.1:{port}"
        envs.append(env)
    return start_pods(c["command"] + c["args"], envs, tmp_path, timeout)


def _ranks(text):
    import re

    joined = re.findall(r"rank (\d+)/(\d+) joined", text)
    done = re.findall(r"rank (\d+)/(\d+) done at step (\d+); weights sha256 (\w+)", text)
    return joined, done


@pytest.mark.slow
def test_rendered_command_under_operator_env_forms_one_ddp_group(synth_dir, tmp_path):
    """2 nodes x 1 process: one DDP group of world size 2, distinct ranks, the same weights."""
    store = tmp_path / "store"
    check_one_group(run_pods(_job(synth_dir, store), tmp_path), store)


def check_one_group(results, store):
    """One DDP group of world size 2 formed: distinct ranks, 3 steps, the same weights."""
    joined, done = [], []
    for rc, text in results:
        assert rc == 0, text[-3000:]
        j, d = _ranks(text)
        joined += j
        done += d
    assert sorted(joined) == [("0", "2"), ("1", "2")], f"each pod must join one group of 2, got {joined}"
    assert len(done) == 2 and {d[2] for d in done} == {"3"}
    assert done[0][3] == done[1][3], f"ranks disagree on the weights: {done}"
    ck = torch.load(store / "ckpt_latest.pt", weights_only=True)
    assert ck["world_size"] == 2 and ck["step"] == 3 and len(ck["rng"]) == 2


# ------------------------------------------------------------------ TrainJob (Kubeflow Trainer v2.3.0)
def _trainjob(data, store, **kw):
    ov = [*TINY, f"--data.source={data}", "--train.max_steps=3", "--train.val_max_images=0", "--model.dropout=0.1"]
    return training_job("captioner-train-contract", "tiny-cpu", ov, str(store), cloud="kind", cpu="1",
                        memory="2Gi", shm_size="256Mi", api="trainjob", **{"workers": 2, "gpus_per_worker": 0, **kw})


def test_trainer_env_for_a_torch_distributed_trainjob(tmp_path):
    from tests.cluster.crd_schemas import TORCH_RUNTIME, load
    from tests.cluster.trainer_contract import check_runtime_ref, command, node_env

    job, runtime = _trainjob(tmp_path, tmp_path / "store"), load(TORCH_RUNTIME)
    check_runtime_ref(job, runtime)
    env = node_env(job, runtime, 1, FAKE_SECRETS)
    assert env["PET_NNODES"] == "2" and env["PET_NPROC_PER_NODE"] == "1" and env["PET_NODE_RANK"] == "1"
    assert env["PET_MASTER_ADDR"] == "captioner-train-contract-node-0-0.captioner-train-contract"
    assert env["PET_MASTER_PORT"] == "29500" and "PET_RDZV_ENDPOINT" not in env
    assert env["AWS_ACCESS_KEY_ID"] == "k"
    assert command(job, runtime)[:4] == ["torchrun", "-m", "captioner", "train"]
    gpu = _trainjob(tmp_path, tmp_path / "store", gpus_per_worker=8)
    assert node_env(gpu, runtime, 0, FAKE_SECRETS)["PET_NPROC_PER_NODE"] == "8"


def run_trainjob_nodes(job, tmp_path, cmd=None, secrets=FAKE_SECRETS, timeout=400):
    """Start each TrainJob node's container command with the env the Trainer v2.3.0 torch
    plugin + kubelet give it (tests/cluster/trainer_contract.py). Differences from a cluster: the
    JobSet pod DNS name <job>-node-0-0.<job> of node 0 is 127.0.0.1 here and the master port
    a free one instead of 29500 (tests run in parallel); each pod has its own folder."""
    from tests.cluster.crd_schemas import TORCH_RUNTIME, load
    from tests.cluster.trainer_contract import check_runtime_ref, command, node_env

    runtime, name = load(TORCH_RUNTIME), job["metadata"]["name"]
    check_runtime_ref(job, runtime)
    port, envs = free_port(), []
    for i in range(job["spec"]["trainer"]["numNodes"]):
        env = node_env(job, runtime, i, secrets)
        assert env["PET_MASTER_ADDR"] == f"{name}-node-0-0.{name}"
        env.update(PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=str(port))
        envs.append(env)
    return start_pods(cmd or command(job, runtime), envs, tmp_path, timeout)


@pytest.mark.slow
def test_rendered_trainjob_command_under_trainer_env_forms_one_ddp_group(synth_dir, tmp_path):
    """2 nodes x 1 process on the torch-distributed runtime: one DDP group of world size 2."""
    store = tmp_path / "store"
    check_one_group(run_trainjob_nodes(_trainjob(synth_dir, store), tmp_path), store)


JOB_RENDER = ["--config", "vit-b16-a100", "--nodes", "2", "--gpus-per-node", "8", "--data", "s3://datasets/flickr30k/v1",
              "--model-uri", "s3://models/runs/manual", "--name", "captioner-train-manual", "--min-nodes", "1",
              "--max-nodes", "4"]


@pytest.mark.parametrize("args", [JOB_RENDER, ["--config", "tiny-cpu", "--nodes", "1", "--gpus-per-node", "0",
                                               "--data", "s3://datasets/x", "--model-uri", "s3://models/runs/t", "--cloud",
                                               "kind", "--train.max_steps=5"]])
def test_job_render_prints_the_pipeline_job_and_validates_strictly(args, crd_validator):
    import yaml

    from captioner.cluster.jobspec import job_name
    from tests.cluster.crd_schemas import check_pytorchjob

    r = run_cli("job", "render", *args)
    assert r.returncode == 0, r.stderr
    job = yaml.safe_load(r.stdout)
    check_pytorchjob(job, crd_validator)  # the vendored v1.9.0 CRD, unknown fields rejected, and the webhook's rules
    a = dict(zip(args[::2], args[1::2]))
    same = training_job(a.get("--name") or job_name("captioner-train", a["--model-uri"]), a["--config"],
                        [f"--data.source={a['--data']}", *[x for x in args if x.startswith("--train.")]],
                        a["--model-uri"], workers=int(a["--nodes"]), gpus_per_worker=int(a["--gpus-per-node"]),
                        cloud=a.get("--cloud", "gke"), min_workers=int(a.get("--min-nodes", 0)) or None,
                        max_workers=int(a.get("--max-nodes", 0)) or None)
    assert job == same, "job render must print what the pipeline's train step builds"
    c = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert c["command"][0] == "torchrun" and "--resume" in c["args"]


def test_template_is_the_render_output():
    import yaml

    r = run_cli("job", "render", *JOB_RENDER)
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load((ROOT / "k8s" / "pytorchjob-template.yaml").read_text()) == yaml.safe_load(r.stdout)


@pytest.mark.parametrize("bad, msg", [(["--nodes", "0"], "--nodes: expected an integer >= 1"),
                                      (["--config", "nope"], "nope")])
def test_job_render_refuses_bad_input(bad, msg):
    args = list(JOB_RENDER)
    for i in range(0, len(bad), 2):
        args[args.index(bad[i]) + 1] = bad[i + 1]
    r = run_cli("job", "render", *args)
    assert r.returncode != 0 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
