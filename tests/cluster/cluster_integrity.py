"""Checks over a whole rendered install (an overlay's `kubectl kustomize` output, the pods
controllers make from our objects, and the compiled KFP pipeline's step pods), not over each
object alone:

- refs(): every Secret, ConfigMap, ServiceAccount and PVC a pod references exists in that
  pod's namespace (or is created by something named in EXTERNAL / by a documented command);
- service_refs(): every in-cluster host:port in args, env, Secrets and annotations names a
  Service of the same render (or one a controller creates from our objects) with that port,
  and a Service selects some pod;
- flow_allowed() / unused_rules(): NetworkPolicy semantics (networking.k8s.io/v1: a pod no
  policy selects for a direction is open in it; else some rule of a selecting policy must
  match peer and port; both ends' policies must allow) over tests/cluster/cluster_flows.py.
"""
from __future__ import annotations

import base64
import ipaddress
import re
from dataclasses import dataclass

from tests.cluster.cluster_flows import FLOWS, NEEDS, STEPS, Ext, Flow, Ours, Outside

WORKLOADS = ("Deployment", "StatefulSet", "Job", "DaemonSet")


@dataclass
class Pod:
    origin: str  # what makes it, for messages
    namespace: str
    labels: dict
    service_account: str
    spec: dict  # a PodSpec (only the fields we read)
    ref: Ours | None = None


@dataclass
class Install:
    """One install: the render plus what controllers and Kubeflow Pipelines add."""
    docs: list
    steps_ns: str
    steps_sa: str
    pods: list
    virtual_services: dict  # (namespace, name) -> [ports]; made by controllers from our objects

    def get(self, kind: str, ns: str, name: str):
        return next((d for d in self.docs if d["kind"] == kind and d["metadata"]["name"] == name
                     and d["metadata"].get("namespace", "") == ns), None)


def _template_pods(docs) -> list:
    out = []
    for d in docs:
        if d["kind"] in WORKLOADS:
            t = d["spec"]["template"]
            out.append(Pod(f"{d['kind']}/{d['metadata']['name']}", d["metadata"]["namespace"],
                           t.get("metadata", {}).get("labels", {}), t["spec"].get("serviceAccountName", "default"),
                           {**t["spec"], "_claims": [c["metadata"]["name"] for c in
                                                     d["spec"].get("volumeClaimTemplates", [])]},
                           Ours(d["kind"], d["metadata"]["name"])))
    return out


def step_pods(platform: dict, steps_ns: str, steps_sa: str) -> list:
    """KFP 2.5's step pods: the driver adds env from secretKeyRef for each secretAsEnv of the
    task (backend/src/v2/driver/driver.go), resolved in the pod's own namespace."""
    out = []
    for ex, conf in platform.items():
        env = []
        for s in conf.get("secretAsEnv", []):
            name = s.get("secretName") or s.get("secretNameParameter", {}).get("runtimeValue", {}).get("constant")
            for k in s["keyToEnv"]:
                env.append({"name": k["envVar"], "valueFrom": {"secretKeyRef": {
                    "name": name, "key": k["secretKey"], "optional": bool(s.get("optional"))}}})
        out.append(Pod(f"KFP step {ex}", steps_ns, {"pipelines.kubeflow.org/v2_component": "true"}, steps_sa,
                       {"containers": [{"name": "main", "env": env}]}))
    return out


def controller_pods(docs, training_job: dict) -> tuple[list, dict]:
    """Pods and Services controllers create from our objects: the training job's pods (the
    job the train step launches, as `captioner job render` prints it), and for each
    InferenceService the predictor pods (KServe: the predictor's serviceAccountName and
    labels, the S3 Secret through that ServiceAccount) and the Service <name>-predictor on
    port 80 (the Knative Service's route; kserve pkg/constants PredictorServiceName)."""
    pods, services = [], {}
    if training_job["kind"] == "PyTorchJob":
        t = training_job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
        spec, labels = t["spec"], t["metadata"]["labels"]
    else:
        rj = training_job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
        t = rj["template"]["spec"]["template"]
        node = {**t["spec"]["containers"][0], "env": training_job["spec"]["trainer"]["env"]}
        spec = {**t["spec"], "containers": [node]}
        labels = t["metadata"]["labels"]
    pods.append(Pod(f"{training_job['kind']} {training_job['metadata']['name']}",
                    training_job["metadata"]["namespace"], labels, spec.get("serviceAccountName", "default"), spec,
                    Ours("TrainingJob")))
    for d in docs:
        if d["kind"] == "InferenceService":
            p, ns = d["spec"]["predictor"], d["metadata"]["namespace"]
            pods.append(Pod(f"InferenceService/{d['metadata']['name']} predictor", ns, p.get("labels", {}),
                            p.get("serviceAccountName", "default"), {"containers": [p["model"]]},
                            Ours("InferenceService", d["metadata"]["name"])))
            services[(ns, f"{d['metadata']['name']}-predictor")] = [80]
    return pods, services


def build_install(docs, steps_ns, steps_sa, platform, training_job) -> Install:
    cpods, vsvc = controller_pods(docs, training_job)
    return Install(docs, steps_ns, steps_sa, _template_pods(docs) + cpods + step_pods(platform, steps_ns, steps_sa),
                   vsvc)


# ------------------------------------------------------------------ references
def _pod_refs(pod: Pod) -> list:
    """(kind, name, key or None, optional) for everything the pod's spec names."""
    out = [("ServiceAccount", pod.service_account, None, False)]
    cs = [*pod.spec.get("initContainers", []), *pod.spec.get("containers", [])]
    for c in cs:
        for e in c.get("env", []):
            vf = e.get("valueFrom", {})
            for kind, key in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                if key in vf:
                    out.append((kind, vf[key]["name"], vf[key]["key"], bool(vf[key].get("optional"))))
        for ef in c.get("envFrom", []):
            for kind, key in (("Secret", "secretRef"), ("ConfigMap", "configMapRef")):
                if key in ef:
                    out.append((kind, ef[key]["name"], None, bool(ef[key].get("optional"))))
    claims = set(pod.spec.get("_claims", []))
    for v in pod.spec.get("volumes", []):
        if "secret" in v:
            out.append(("Secret", v["secret"]["secretName"], None, bool(v["secret"].get("optional"))))
        if "configMap" in v:
            out.append(("ConfigMap", v["configMap"]["name"], None, bool(v["configMap"].get("optional"))))
        if "persistentVolumeClaim" in v and v["persistentVolumeClaim"]["claimName"] not in claims:
            out.append(("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"], None, False))
    return out


def _keys(obj: dict) -> set:
    return set(obj.get("data") or {}) | set(obj.get("stringData") or {})


def refs(inst: Install, external: dict) -> list[str]:
    """Missing references, one line each. `external`: (kind, namespace, name) -> who creates it."""
    errs = []

    def exists(kind, ns, name):
        return inst.get(kind, ns, name) is not None or (kind, ns, name) in external or \
            (kind == "ServiceAccount" and name == "default")

    for pod in inst.pods:
        for kind, name, key, optional in _pod_refs(pod):
            obj = inst.get(kind, pod.namespace, name)
            if obj is None and not exists(kind, pod.namespace, name):
                if not optional:
                    where = [d["metadata"].get("namespace") for d in inst.docs
                             if d["kind"] == kind and d["metadata"]["name"] == name]
                    errs.append(f"{pod.origin} (namespace {pod.namespace}) references {kind} {name!r}, which is not "
                                f"in {pod.namespace}" + (f" (only in {where})" if where else ""))
            elif obj is not None and key is not None and key not in _keys(obj) and not optional:
                errs.append(f"{pod.origin}: {kind} {pod.namespace}/{name} has no key {key!r}")
    for d in inst.docs:
        ns = d["metadata"].get("namespace", "")
        if d["kind"] == "ServiceAccount":
            for s in d.get("secrets", []):
                if not exists("Secret", ns, s["name"]):
                    errs.append(f"ServiceAccount {ns}/{d['metadata']['name']} lists Secret {s['name']!r}, not in {ns}")
        if d["kind"] == "RoleBinding":
            for s in d.get("subjects", []):
                if s["kind"] == "ServiceAccount" and not exists("ServiceAccount", s.get("namespace", ns), s["name"]):
                    errs.append(f"RoleBinding {ns}/{d['metadata']['name']} binds ServiceAccount "
                                f"{s.get('namespace', ns)}/{s['name']}, which nothing creates")
            if d["roleRef"]["kind"] == "Role" and not exists("Role", ns, d["roleRef"]["name"]):
                errs.append(f"RoleBinding {ns}/{d['metadata']['name']} names Role {d['roleRef']['name']!r}, "
                            f"not in {ns}")
        if d["kind"] == "Ingress":
            for t in d["spec"].get("tls", []):
                if not exists("Secret", ns, t["secretName"]):
                    errs.append(f"Ingress {ns}/{d['metadata']['name']} names TLS Secret {t['secretName']!r}, which "
                                "nothing creates and no documented command makes")
            for r in d["spec"].get("rules", []):
                for p in r.get("http", {}).get("paths", []):
                    svc = p["backend"]["service"]
                    if not _service_port(inst, ns, svc["name"], svc["port"].get("number"), svc["port"].get("name")):
                        errs.append(f"Ingress {ns}/{d['metadata']['name']} routes to Service {svc['name']} "
                                    f"port {svc['port']}, not in the render")
    for d in inst.docs:
        if d["kind"] == "HorizontalPodAutoscaler" or d["kind"] == "PodDisruptionBudget":
            pass  # their targets are checked by the object tests
    return errs


# ------------------------------------------------------------------ Service hosts and ports
_FQDN = re.compile(r"\b([a-z0-9]([-a-z0-9]*[a-z0-9])?)\.([a-z0-9]([-a-z0-9]*[a-z0-9])?)\.svc(\.cluster\.local)?:(\d+)")
_SHORT_URL = re.compile(r"://([a-z0-9]([-a-z0-9]*[a-z0-9])?):(\d+)")


def _strings(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, str):
        yield obj


def _selects(sel: dict, labels: dict) -> bool:
    for k, v in (sel.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in sel.get("matchExpressions") or []:
        op, have = e["operator"], labels.get(e["key"])
        if (op == "In" and have not in e["values"]) or (op == "NotIn" and have in e["values"]) or \
                (op == "Exists" and e["key"] not in labels) or (op == "DoesNotExist" and e["key"] in labels):
            return False
    return True


def policy_allows(policies, direction, pod, peer, port, peer_ns="captioner", peer_ns_labels=None):
    """Kubernetes NetworkPolicy semantics, for one namespace: a flow is allowed when some
    policy selecting `pod` for `direction` has a rule whose peers and ports match; a pod no
    policy selects for that direction is unrestricted (here default-deny selects every pod)."""
    ns_labels = {"kubernetes.io/metadata.name": peer_ns, **(peer_ns_labels or {})}
    key = "ingress" if direction == "Ingress" else "egress"
    peers_key = "from" if key == "ingress" else "to"
    selecting = [p for p in policies if direction in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], pod)]
    if not selecting:
        return True
    for p in selecting:
        for rule in p["spec"].get(key, []):
            ports = rule.get("ports")
            if ports and not any(x.get("port") == port for x in ports):
                continue
            peers = rule.get(peers_key)
            if not peers:
                return True
            for pe in peers:
                if "ipBlock" in pe:
                    continue
                ns_ok = _selects(pe["namespaceSelector"], ns_labels) if "namespaceSelector" in pe else peer_ns == "captioner"
                pod_ok = _selects(pe["podSelector"], peer) if "podSelector" in pe else True
                if ns_ok and pod_ok:
                    return True
    return False


def _service_port(inst: Install, ns: str, name: str, port: int | None, port_name: str | None = None) -> bool:
    if (ns, name) in inst.virtual_services:
        return port is None or port in inst.virtual_services[(ns, name)]
    svc = inst.get("Service", ns, name)
    if svc is None:
        return False
    if not any(port is not None and p["port"] == port or port_name and p.get("name") == port_name
               for p in svc["spec"]["ports"]):
        return False
    sel = svc["spec"].get("selector")
    return not sel or any(p.namespace == ns and _selects({"matchLabels": sel}, p.labels) for p in inst.pods)


def host_ports(text: str, default_ns: str) -> list[tuple[str, str, int]]:
    """In-cluster (namespace, service, port) named in a string: name.ns.svc[.cluster.local]:port,
    or a URL http://name:port (the pod's own namespace)."""
    out = [(m.group(3), m.group(1), int(m.group(6))) for m in _FQDN.finditer(text)]
    out += [(default_ns, m.group(1), int(m.group(3))) for m in _SHORT_URL.finditer(text)
            if m.group(1) not in ("localhost",)]
    return out


def service_refs(inst: Install) -> list[str]:
    errs = []
    sources = [(p.origin, p.namespace, p.spec.get("containers", []) + p.spec.get("initContainers", []))
               for p in inst.pods]
    sources += [(f"{d['kind']} {d['metadata'].get('namespace')}/{d['metadata']['name']}",
                 d["metadata"].get("namespace", ""),
                 [{k: base64.b64decode(v).decode() if d["kind"] == "Secret" else v
                   for k, v in (d.get("data") or {}).items()},
                  d.get("stringData") or {}, d["metadata"].get("annotations") or {}])
                for d in inst.docs if d["kind"] in ("Secret", "ConfigMap", "InferenceService")]
    for origin, ns, blobs in sources:
        for s in _strings(blobs):
            for svc_ns, name, port in host_ports(s, ns):
                if not _service_port(inst, svc_ns, name, port):
                    errs.append(f"{origin} names {name}.{svc_ns}:{port} ({s!r}), which no Service of this install "
                                "serves")
    return errs


# ------------------------------------------------------------------ NetworkPolicies
@dataclass(frozen=True)
class End:
    namespace: str
    labels: tuple = ()
    ip: str = ""


def resolve(side, inst: Install) -> list[End]:
    if isinstance(side, Outside):
        return [End("", (), side.ip)]
    if isinstance(side, Ext):
        return [End(inst.steps_ns if side.namespace == STEPS else side.namespace, side.labels)]
    return [End(p.namespace, tuple(sorted(p.labels.items()))) for p in inst.pods if p.ref == side]


def _peer_matches(peer: dict, policy_ns: str, end: End) -> bool:
    if "ipBlock" in peer:
        if not end.ip:
            return False
        b = peer["ipBlock"]
        ip = ipaddress.ip_address(end.ip)
        return ip in ipaddress.ip_network(b["cidr"]) and not any(ip in ipaddress.ip_network(x)
                                                                 for x in b.get("except", []))
    if end.ip:
        return False
    if "namespaceSelector" in peer:
        ns_ok = _selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": end.namespace})
    else:
        ns_ok = end.namespace == policy_ns
    return ns_ok and _selects(peer.get("podSelector") or {}, dict(end.labels))


def _port_ok(rule_ports, port) -> bool:
    if not rule_ports:
        return True
    return port is not None and any(p.get("port") == port for p in rule_ports)


def _side_allows(pols, direction: str, local: End, remote: End, port) -> bool:
    if local.ip:
        return True
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    selecting = [p for p in pols if p["metadata"].get("namespace") == local.namespace
                 and direction in p["spec"].get("policyTypes", ["Ingress"])
                 and _selects(p["spec"]["podSelector"], dict(local.labels))]
    if not selecting:
        return True
    for p in selecting:
        for rule in p["spec"].get(key) or []:
            if not _port_ok(rule.get("ports"), port):
                continue
            peers = rule.get(peers_key)
            if not peers or any(_peer_matches(pe, p["metadata"]["namespace"], remote) for pe in peers):
                return True
    return False


def applies(flow: Flow, inst: Install) -> bool:
    need = NEEDS.get(flow.name)
    return all(resolve(side, inst) for side in (flow.src, flow.dst, *([need] if need else [])))


def flow_allowed(flow: Flow, inst: Install) -> list[str]:
    """Denials of `flow` (empty: allowed for every pod of both sides and every port)."""
    pols = [d for d in inst.docs if d["kind"] == "NetworkPolicy"]
    errs = []
    for s in resolve(flow.src, inst):
        for d in resolve(flow.dst, inst):
            for port in flow.ports or (None,):
                if not _side_allows(pols, "Egress", s, d, port):
                    errs.append(f"{flow.name}: egress of {s.namespace}{dict(s.labels)} to {d.namespace or d.ip}"
                                f"{dict(d.labels)} port {port or 'any'} is denied")
                if not _side_allows(pols, "Ingress", d, s, port):
                    errs.append(f"{flow.name}: ingress of {d.namespace}{dict(d.labels)} from {s.namespace or s.ip}"
                                f"{dict(s.labels)} port {port or 'any'} is denied")
    return errs


def unused_rules(inst: Install) -> list[str]:
    """Every NetworkPolicy rule part (peer x port) that no applicable flow uses: traffic
    allowed that the system does not need."""
    flows = [f for f in FLOWS if applies(f, inst)]
    out = []
    for p in (d for d in inst.docs if d["kind"] == "NetworkPolicy"):
        ns = p["metadata"]["namespace"]
        for direction, key, peers_key in (("Ingress", "ingress", "from"), ("Egress", "egress", "to")):
            for i, rule in enumerate(p["spec"].get(key) or []):
                for peer in rule.get(peers_key) or [{}]:
                    for rp in rule.get("ports") or [None]:
                        want = None if rp is None else rp.get("port")
                        used = False
                        for f in flows:
                            local_side, remote_side = (f.dst, f.src) if direction == "Ingress" else (f.src, f.dst)
                            if want is None and f.ports is not None or want is not None and (
                                    f.ports is not None and want not in f.ports):
                                continue
                            locs = [e for e in resolve(local_side, inst) if not e.ip and e.namespace == ns
                                    and _selects(p["spec"]["podSelector"], dict(e.labels))]
                            rems = [e for e in resolve(remote_side, inst) if not peer or _peer_matches(peer, ns, e)]
                            if locs and rems:
                                used = True
                                break
                        if not used:
                            out.append(f"NetworkPolicy {ns}/{p['metadata']['name']} {key}[{i}] "
                                       f"{peers_key} {peer or 'anyone'} port {want or 'any'}: no flow needs it")
    return out
