"""Who may do what, and which Secret is where, in the rendered manifests (tests/cluster/rbac_eval.py
follows the Kubernetes RBAC authorizer's rules)."""
import pytest

from captioner.cluster.jobspec import JobSpec
from captioner.cluster.pytorchjob import build_pytorchjob
from captioner.core.deployment import (JOB_NAMESPACE, KFP_STEP_NAMESPACE, KFP_STEP_SERVICE_ACCOUNT, S3_SECRET,
                                       TRAINER_S3_SECRET, TRAINER_SERVICE_ACCOUNT)
from tests.cluster.manifests import OVERLAYS, render
from tests.cluster.rbac_eval import Rbac, Request, sa_user
from tests.cluster.test_kserve import kserve_docs  # noqa: F401 - fixture

# where each overlay's pipeline steps run, and as whom (single-user KFP: kubeflow/pipeline-runner;
# multi-user: default-editor in the profile namespace)
STEP_IDENTITY = {o: (KFP_STEP_NAMESPACE, KFP_STEP_SERVICE_ACCOUNT) for o in OVERLAYS}
STEP_IDENTITY["multi-user-example"] = ("kubeflow-user-example-com", "default-editor")
VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")
RESOURCES = [("kubeflow.org", "pytorchjobs"), ("", "pods"), ("", "pods/log"), ("", "pods/exec"), ("", "secrets"),
             ("", "configmaps"), ("", "serviceaccounts"), ("rbac.authorization.k8s.io", "rolebindings"),
             ("apps", "deployments"), ("batch", "jobs")]


def answers(docs, step_ns, step_sa):
    """Answered from the manifests: may the identity running the pipeline steps create, follow and
    delete the training job (and read its pods' logs); what may the trainer's own account do; is
    each S3 Secret, with its three keys, in the namespace of the pods that read it."""
    rbac = Rbac(docs)
    runner = sa_user(step_ns, step_sa)
    launcher_ok = all(rbac.allowed(Request(runner, v, "kubeflow.org", "pytorchjobs", JOB_NAMESPACE))
                      for v in ("create", "get", "delete")) and \
        all(rbac.allowed(Request(runner, "get", "", r, JOB_NAMESPACE)) for r in ("pods", "pods/log"))
    trainer = sa_user(JOB_NAMESPACE, TRAINER_SERVICE_ACCOUNT)
    trainer_grants = rbac.grants(trainer)
    secrets_ok = {}
    for where, name in ((step_ns, S3_SECRET), (JOB_NAMESPACE, TRAINER_S3_SECRET)):
        sec = rbac.secret(where, name)
        secrets_ok[f"{where}/{name}"] = bool(sec) and {"endpoint", "access-key", "secret-key"} <= set(
            sec.get("data", {}) or sec.get("stringData", {}))
    return launcher_ok, trainer_grants, secrets_ok


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_step_identity_may_launch_pytorchjobs_in_the_job_namespace(overlay):
    launcher_ok, _, _ = answers(render(overlay), *STEP_IDENTITY[overlay])
    assert launcher_ok, f"{STEP_IDENTITY[overlay]} may not create/get/delete pytorchjobs in {JOB_NAMESPACE}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_trainer_account_may_do_nothing(overlay):
    docs = render(overlay)
    _, grants, _ = answers(docs, *STEP_IDENTITY[overlay])
    assert grants == [], f"the trainer's account has permissions: {grants}"
    rbac, trainer = Rbac(docs), sa_user(JOB_NAMESPACE, TRAINER_SERVICE_ACCOUNT)
    assert not any(rbac.allowed(Request(trainer, v, g, r, JOB_NAMESPACE)) for v in VERBS for g, r in RESOURCES)
    sa = next(d for d in docs if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == TRAINER_SERVICE_ACCOUNT)
    assert sa["automountServiceAccountToken"] is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_s3_secret_exists_where_each_step_runs(overlay):
    _, _, secrets_ok = answers(render(overlay), *STEP_IDENTITY[overlay])
    assert all(secrets_ok.values()), secrets_ok


def test_the_steps_identity_is_nothing_more():
    """pipeline-runner gets PyTorchJobs and pod logs in the job namespace, not Secrets or exec."""
    rbac = Rbac(render("kind"))
    runner = sa_user(KFP_STEP_NAMESPACE, KFP_STEP_SERVICE_ACCOUNT)
    for g, r, v in (("", "secrets", "get"), ("", "pods/exec", "create"), ("rbac.authorization.k8s.io",
                                                                         "rolebindings", "create")):
        assert not rbac.allowed(Request(runner, v, g, r, JOB_NAMESPACE))
    assert not rbac.allowed(Request(runner, "create", "kubeflow.org", "pytorchjobs", "default"))


def test_evaluator_follows_rbac_rules():
    role = {"kind": "Role", "metadata": {"name": "r", "namespace": "a"},
            "rules": [{"apiGroups": ["kubeflow.org"], "resources": ["pytorchjobs"], "verbs": ["create"]},
                      {"apiGroups": [""], "resources": ["*/log"], "verbs": ["get"], "resourceNames": ["p1"]}]}
    rb = {"kind": "RoleBinding", "metadata": {"name": "b", "namespace": "a"},
          "roleRef": {"kind": "Role", "name": "r"}, "subjects": [{"kind": "Group", "name": "system:serviceaccounts:x"}]}
    rbac = Rbac([role, rb])
    u = sa_user("x", "any")
    assert rbac.allowed(Request(u, "create", "kubeflow.org", "pytorchjobs", "a"))
    assert not rbac.allowed(Request(u, "create", "kubeflow.org", "pytorchjobs", "b"))  # other namespace
    assert not rbac.allowed(Request(u, "delete", "kubeflow.org", "pytorchjobs", "a"))  # other verb
    assert not rbac.allowed(Request(sa_user("y", "any"), "create", "kubeflow.org", "pytorchjobs", "a"))
    assert rbac.allowed(Request(u, "get", "", "pods/log", "a", "p1"))
    assert not rbac.allowed(Request(u, "get", "", "pods/log", "a", "p2"))  # resourceNames
    assert not rbac.allowed(Request(u, "get", "", "pods", "a", "p1"))


def test_trainer_pods_run_restricted():
    pod = build_pytorchjob(JobSpec(name="t"))["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    assert pod["serviceAccountName"] == TRAINER_SERVICE_ACCOUNT and pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    c = pod["containers"][0]["securityContext"]
    assert c["capabilities"]["drop"] == ["ALL"] and c["allowPrivilegeEscalation"] is False
    env = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in pod["containers"][0]["env"] if "valueFrom" in e}
    assert set(env.values()) == {TRAINER_S3_SECRET}


def test_missing_credentials_file_is_named(tmp_path):
    """Nothing is committed: without secrets/*.env kustomize stops and names the file."""
    import shutil
    import subprocess

    from tests.cluster.manifests import K8S

    shutil.copytree(K8S, tmp_path / "k8s", ignore=shutil.ignore_patterns("*.env"))
    r = subprocess.run(["kubectl", "kustomize", str(tmp_path / "k8s" / "overlays" / "kind")], capture_output=True,
                       text=True)
    assert r.returncode != 0 and "secrets/minio-root.env" in r.stderr and "no such file" in r.stderr, r.stderr
    assert not list(K8S.rglob("*.env")) or all(p.parent.name == "secrets" for p in K8S.rglob("*.env"))
    tracked = subprocess.run(["git", "ls-files", "k8s"], capture_output=True, text=True, cwd=K8S.parent).stdout
    assert ".env" not in tracked and "change-me" not in "".join(p.read_text() for p in K8S.rglob("*.yaml"))


def _policy(overlay_docs, name):
    import json

    cm = next(d for d in overlay_docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "minio-policies")
    return json.loads(cm["data"][f"{name}.json"])


@pytest.mark.parametrize("who, allowed, denied", [
    ("captioner-triton", [("get", "models", "serving/captioner/config.pbtxt"), ("list", "models", "serving/")],
     [("put", "models", "serving/captioner/config.pbtxt"), ("get", "models", "runs/r1/ckpt_best.pt"),
      ("get", "datasets", "flickr/manifest.json"), ("delete", "models", "serving/captioner/config.pbtxt")]),
    ("captioner-trainer", [("get", "datasets", "flickr/manifest.json"), ("put", "models", "runs/r1/ckpt_latest.pt")],
     [("put", "datasets", "flickr/manifest.json"), ("put", "models", "serving/captioner/config.pbtxt")]),
    ("captioner-tensorboard", [("get", "models", "runs/r1/tb/events.out.tfevents.1"), ("list", "models", "runs/")],
     [("put", "models", "runs/r1/tb/events.out.tfevents.2"), ("delete", "models", "runs/r1/tb/events.out.tfevents.1"),
      ("get", "models", "serving/captioner/config.pbtxt"), ("get", "datasets", "flickr/manifest.json")]),
])
def test_minio_policies_scope_each_component(s3_server, who, allowed, denied):
    """The policies from the rendered ConfigMap, enforced by the S3 test server's IAM (moto
    evaluates AWS policy documents, as MinIO does)."""
    import io
    import json
    import uuid

    import boto3
    from botocore.exceptions import ClientError

    url = "http://" + s3_server["CAPTIONER_S3_ENDPOINT"]
    admin = dict(endpoint_url=url, region_name="us-east-1", aws_access_key_id=s3_server["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=s3_server["AWS_SECRET_ACCESS_KEY"])
    s3a = boto3.client("s3", **admin)
    for b in ("datasets", "models"):
        try:
            s3a.create_bucket(Bucket=b)
        except ClientError:
            pass
    for op, b, k in allowed + denied:
        s3a.put_object(Bucket=b, Key=k, Body=b"x")
    iam = boto3.client("iam", **admin)
    user = f"{who}-{uuid.uuid4().hex[:6]}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName=who, PolicyDocument=json.dumps(_policy(render("kind"), who)))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id=key["AccessKeyId"],
                      aws_secret_access_key=key["SecretAccessKey"])

    def do(op, b, k):
        if op == "get":
            s3.get_object(Bucket=b, Key=k)["Body"].read()
        elif op == "put":
            s3.upload_fileobj(io.BytesIO(b"y"), b, k)
        elif op == "delete":
            s3.delete_object(Bucket=b, Key=k)
        else:
            s3.list_objects_v2(Bucket=b, Prefix=k)

    for req in allowed:
        do(*req)
    for req in denied:
        with pytest.raises(ClientError, match="AccessDenied"):
            do(*req)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_step_identity_may_launch_trainjobs_in_the_job_namespace(overlay):
    """--train.api=trainjob: the same identity launches Kubeflow Trainer v2 TrainJobs."""
    rbac = Rbac(render(overlay))
    runner = sa_user(*STEP_IDENTITY[overlay])
    for v in ("create", "get", "delete"):
        assert rbac.allowed(Request(runner, v, "trainer.kubeflow.org", "trainjobs", JOB_NAMESPACE)), v
    assert not rbac.allowed(Request(runner, "create", "trainer.kubeflow.org", "trainjobs", "default"))


def test_kserve_overlay_lets_the_deploy_step_patch_only_the_inferenceservice(kserve_docs):
    docs, _ = kserve_docs
    rbac = Rbac(docs)
    runner = sa_user(KFP_STEP_NAMESPACE, KFP_STEP_SERVICE_ACCOUNT)
    for v in ("get", "create", "patch"):
        assert rbac.allowed(Request(runner, v, "serving.kserve.io", "inferenceservices", JOB_NAMESPACE)), v
    assert not rbac.allowed(Request(runner, "delete", "serving.kserve.io", "inferenceservices", JOB_NAMESPACE))
    assert not rbac.grants(sa_user(JOB_NAMESPACE, "captioner-kserve")), "the predictor's account may do nothing"
