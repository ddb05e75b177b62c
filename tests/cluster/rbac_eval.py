"""A small Kubernetes RBAC evaluator over rendered manifests, following the authorizer's
rules (kubernetes.io/docs/reference/access-authn-authz/rbac and plugin/pkg/auth/authorizer/
rbac/rbac.go + pkg/apis/rbac/helpers.go in kubernetes/kubernetes):
- a request is allowed when some binding's subject matches the user and the bound role has
  a rule matching it (RBAC only adds permissions; there are no deny rules);
- a RoleBinding grants its Role (same namespace) or a ClusterRole, only in its own namespace;
  a ClusterRoleBinding grants a ClusterRole in every namespace;
- subjects: ServiceAccount {name, namespace} = user "system:serviceaccount:NS:NAME", member of
  groups "system:serviceaccounts", "system:serviceaccounts:NS", "system:authenticated";
  User and Group subjects by name;
- a rule matches when apiGroups, resources (a "res/sub" subresource is its own resource;
  "*" matches all, "*/sub" any resource's sub) and verbs match ("*" = any), and
  resourceNames is empty or names the object.
Only the manifests given are considered (not the cluster's built-in bindings)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Request:
    user: str  # e.g. system:serviceaccount:kubeflow:pipeline-runner
    verb: str
    group: str  # "" = core
    resource: str  # "pytorchjobs", "pods/log"
    namespace: str
    name: str = ""


def sa_user(namespace: str, name: str) -> str:
    return f"system:serviceaccount:{namespace}:{name}"


def _groups(user: str) -> set[str]:
    g = {"system:authenticated"}
    if user.startswith("system:serviceaccount:"):
        ns = user.split(":")[2]
        g |= {"system:serviceaccounts", f"system:serviceaccounts:{ns}"}
    return g


def _subject_matches(subject: dict, binding_ns: str, user: str) -> bool:
    kind = subject.get("kind")
    if kind == "ServiceAccount":
        ns = subject.get("namespace") or binding_ns  # namespace is required; kubectl defaults it
        return user == sa_user(ns, subject["name"])
    if kind == "User":
        return subject.get("name") == user
    if kind == "Group":
        return subject.get("name") in _groups(user)
    return False


def _has(values: list, want: str) -> bool:
    return "*" in values or want in values


def _resource_matches(resources: list, want: str) -> bool:
    if "*" in resources or want in resources:
        return True
    if "/" in want:
        return f"*/{want.split('/', 1)[1]}" in resources
    return False


def rule_allows(rule: dict, r: Request) -> bool:
    return (_has(rule.get("verbs", []), r.verb) and _has(rule.get("apiGroups", []), r.group)
            and _resource_matches(rule.get("resources", []), r.resource)
            and (not rule.get("resourceNames") or r.name in rule["resourceNames"]))


class Rbac:
    def __init__(self, docs: list[dict]):
        self.docs = [d for d in docs if d]
        by = lambda kind: [d for d in self.docs if d.get("kind") == kind]  # noqa: E731
        self.roles = {(d["metadata"].get("namespace", "default"), d["metadata"]["name"]): d for d in by("Role")}
        self.cluster_roles = {d["metadata"]["name"]: d for d in by("ClusterRole")}
        self.bindings = by("RoleBinding") + by("ClusterRoleBinding")

    def _role_rules(self, binding: dict) -> list[dict]:
        ref = binding["roleRef"]
        if ref["kind"] == "ClusterRole":
            role = self.cluster_roles.get(ref["name"])
        else:
            role = self.roles.get((binding["metadata"].get("namespace", "default"), ref["name"]))
        return (role or {}).get("rules", []) or []

    def grants(self, user: str) -> list[tuple[str, dict]]:
        """(namespace or '*', rule) for every rule bound to the user."""
        out = []
        for b in self.bindings:
            ns = b["metadata"].get("namespace", "default") if b["kind"] == "RoleBinding" else "*"
            if any(_subject_matches(s, ns, user) for s in b.get("subjects", []) or []):
                out += [(ns, rule) for rule in self._role_rules(b)]
        return out

    def allowed(self, r: Request) -> bool:
        return any(ns in ("*", r.namespace) and rule_allows(rule, r) for ns, rule in self.grants(r.user))

    def secret(self, namespace: str, name: str) -> dict | None:
        return next((d for d in self.docs if d.get("kind") == "Secret" and d["metadata"]["name"] == name
                     and d["metadata"].get("namespace") == namespace), None)
