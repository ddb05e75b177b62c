"""`captioner job render`: the training job the pipeline's train step would create, for kubectl."""
from __future__ import annotations

import sys

from captioner.cli.args import COUNT_OR_ALL, POSITIVE, check_for_pods
from captioner.core.deployment import JOB_NAMESPACE, NODE_POOLS, TRAINER_IMAGE  # defaults in --help


def cmd_job(a, overrides):
    """`captioner job render`: the PyTorchJob or TrainJob the pipeline's train step would create."""
    import yaml

    from captioner.cluster.jobs import training_job
    from captioner.cluster.jobspec import job_name
    from captioner.core.config import load_config

    check_for_pods("job render", a.config, {"--data": a.data, "--model-uri": a.model_uri})
    load_config(a.config, [f"--data.source={a.data}", *overrides])  # fail here, not in the pods
    job = training_job(a.name or job_name("captioner-train", a.model_uri), a.config,
                       [f"--data.source={a.data}", *overrides], a.model_uri, workers=a.nodes,
                       gpus_per_worker=a.gpus_per_node, image=a.image, namespace=a.namespace, cloud=a.cloud,
                       min_workers=a.min_nodes, max_workers=a.max_nodes, api=a.api)
    sys.stdout.write(yaml.safe_dump(job, sort_keys=False))


EXAMPLE = ("captioner job render --config vit-b16-a100 --nodes 2 --gpus-per-node 8 --data s3://datasets/flickr30k/v1 "
           "--model-uri s3://models/runs/r1")


def add_job(sub, common: dict) -> None:
    s = sub.add_parser("job", **common, help="render the training PyTorchJob for kubectl (no Kubeflow Pipelines needed)",
                       description="job render: print the PyTorchJob (Kubeflow Training Operator v1.9) that the "
                                   f"pipeline's train step would create, e.g. `kubectl create -f <({EXAMPLE})`. Extra "
                                   "--section.key=value arguments become training overrides.")
    jsub = s.add_subparsers(dest="job_cmd", required=True, metavar="{render}")
    jr = jsub.add_parser("render", help="print the PyTorchJob or TrainJob YAML", **common)
    jr.add_argument("--config", required=True, help="training preset or YAML inside the image")
    jr.add_argument("--nodes", type=POSITIVE, required=True, help="worker nodes (pods)")
    jr.add_argument("--gpus-per-node", type=COUNT_OR_ALL, required=True,
                    help="GPUs per node = processes per node (0 = CPU)")
    jr.add_argument("--data", required=True, help="dataset written by `captioner ingest` (s3:// URI)")
    jr.add_argument("--model-uri", required=True, help="model store for checkpoints (s3:// URI); restarts resume here")
    jr.add_argument("--image", default=TRAINER_IMAGE, help="trainer image")
    jr.add_argument("--name", default=None, help="job name (default: derived from --model-uri)")
    jr.add_argument("--namespace", default=JOB_NAMESPACE, help="namespace of the job")
    jr.add_argument("--cloud", choices=list(NODE_POOLS), default="gke", help="node pool")
    jr.add_argument("--min-nodes", type=POSITIVE, default=None, help="elastic: fewest nodes to run with (default: --nodes)")
    jr.add_argument("--max-nodes", type=POSITIVE, default=None, help="elastic: most nodes (default: --nodes)")
    jr.add_argument("--api", choices=["pytorchjob", "trainjob"], default="pytorchjob",
                    help="pytorchjob: kubeflow.org/v1 PyTorchJob (Training Operator v1.9); trainjob: "
                         "trainer.kubeflow.org/v1alpha1 TrainJob on the torch-distributed runtime (Trainer v2.3, "
                         "no elastic range)")
    jr.set_defaults(fn=cmd_job, overrides_ok=True)
