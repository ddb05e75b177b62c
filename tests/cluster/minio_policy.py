"""MinIO's authorisation of an S3 request under a user's policy, written from MinIO's source
(github.com/minio/minio tag RELEASE.2025-04-22T22-12-26Z, the image k8s/base/minio.yaml pins,
and github.com/minio/pkg v3.1.0, the policy package that release uses):

- route(): which handler a request reaches and which action that handler authorises
  (cmd/api-router.go registerAPIRouter: object routes first -- HEAD object, PUT with
  partNumber&uploadId, GET with uploadId, POST with uploadId, POST with uploads, DELETE with
  uploadId, GET, PUT with x-amz-copy-source, PUT, DELETE -- then bucket routes: GET ?location,
  GET ?uploads, GET ?list-type=2, GET ?versions, PUT, HEAD, POST ?delete, GET (ListObjectsV1)).
  Actions: cmd/object-handlers.go headObjectHandler/getObjectHandler -> s3:GetObject,
  PutObjectHandler -> s3:PutObject, CopyObjectHandler -> s3:PutObject on the target and
  s3:GetObject on the source, DeleteObjectHandler -> s3:DeleteObject;
  cmd/object-multipart-handlers.go NewMultipartUpload/PutObjectPart/CompleteMultipartUpload
  -> s3:PutObject, AbortMultipartUpload -> s3:AbortMultipartUpload, ListObjectParts ->
  s3:ListMultipartUploadParts; cmd/bucket-handlers.go HeadBucketHandler -> s3:ListBucket (!),
  GetBucketLocationHandler -> s3:GetBucketLocation, ListMultipartUploadsHandler ->
  s3:ListBucketMultipartUploads, DeleteMultipleObjectsHandler -> s3:DeleteObject per key,
  PutBucketHandler -> s3:CreateBucket; cmd/bucket-listobjects-handlers.go ListObjectsV1/V2
  -> s3:ListBucket, ListObjectVersions -> s3:ListBucketVersions; GET / (ListBuckets) ->
  s3:ListAllMyBuckets.
- condition_values(): cmd/bucket-policy.go getConditionValues: the request's query values
  (r.Form) become condition values under their own names ("prefix" is what `s3:prefix`
  reads, policy/condition/keyname.go KeyName.Name strips "s3:"), plus headers; a HEAD of a
  bucket has no query, so it carries no `prefix`.
- is_allowed(): policy/policy.go Policy.IsAllowed (any Deny statement that matches denies;
  else any Allow statement that matches allows; else denied), policy/statement.go
  Statement.IsAllowed (action in Actions, resource "<bucket>/" or "<bucket>/<object>"
  matches a Resource, then every condition holds), policy/resource.go Resource.Match
  (path.Clean(resource) == pattern, else wildcard.Match), policy/actionset.go
  ActionSet.Match (wildcard.Match on action names; s3:GetObjectVersion implies
  s3:GetObject), wildcard/match.go Match ('*' any run, '?' one character),
  policy/condition: stringFunc.eval (StringEquals / StringNotEquals, ForAllValues: true
  when the request has no value), stringLikeFunc.eval (StringLike / StringNotLike: true
  when any request value matches; no request value -> false, or true under
  ForAllValues:), nullFunc.evaluate (Null true: the key is absent).
"""
from __future__ import annotations

from dataclasses import dataclass

ARN = "arn:aws:s3:::"


@dataclass(frozen=True)
class Check:
    """One authorisation MinIO makes for a request: action on bucket[/object]."""
    action: str
    bucket: str
    object: str = ""


def _split(path: str) -> tuple[str, str]:
    bucket, _, obj = path.lstrip("/").partition("/")
    return bucket, obj


def route(req: dict) -> list[Check]:
    """The checks MinIO's router + handler make for a path-style request
    {"method", "path", "query", "headers"?}."""
    m, q = req["method"].upper(), req.get("query") or {}
    h = {k.lower(): v for k, v in (req.get("headers") or {}).items()}
    bucket, obj = _split(req["path"])
    if not bucket:
        if m == "GET":
            return [Check("s3:ListAllMyBuckets", "")]
        raise ValueError(f"no MinIO route for {m} /")
    if obj:
        copy_src = h.get("x-amz-copy-source")
        if m == "HEAD":
            return [Check("s3:GetObject", bucket, obj)]
        if m == "PUT" and "partNumber" in q and "uploadId" in q:
            if copy_src:
                sb, so = _split(copy_src.split("?")[0])
                return [Check("s3:PutObject", bucket, obj), Check("s3:GetObject", sb, so)]
            return [Check("s3:PutObject", bucket, obj)]
        if m == "GET" and "uploadId" in q:
            return [Check("s3:ListMultipartUploadParts", bucket, obj)]
        if m == "POST" and "uploadId" in q:
            return [Check("s3:PutObject", bucket, obj)]
        if m == "POST" and "uploads" in q:
            return [Check("s3:PutObject", bucket, obj)]
        if m == "DELETE" and "uploadId" in q:
            return [Check("s3:AbortMultipartUpload", bucket, obj)]
        if m == "GET":
            return [Check("s3:GetObject", bucket, obj)]
        if m == "PUT" and copy_src:
            sb, so = _split(copy_src.split("?")[0])
            return [Check("s3:PutObject", bucket, obj), Check("s3:GetObject", sb, so)]
        if m == "PUT":
            return [Check("s3:PutObject", bucket, obj)]
        if m == "DELETE":
            return [Check("s3:DeleteObject", bucket, obj)]
        raise ValueError(f"no MinIO object route for {m} {req['path']}")
    if m == "GET" and "location" in q:
        return [Check("s3:GetBucketLocation", bucket)]
    if m == "GET" and "uploads" in q:
        return [Check("s3:ListBucketMultipartUploads", bucket)]
    if m == "GET" and "versions" in q:
        return [Check("s3:ListBucketVersions", bucket)]
    if m == "GET":  # ListObjectsV2 (list-type=2) or ListObjectsV1
        return [Check("s3:ListBucket", bucket)]
    if m == "HEAD":
        return [Check("s3:ListBucket", bucket)]
    if m == "PUT":
        return [Check("s3:CreateBucket", bucket)]
    if m == "POST" and "delete" in q:
        # one s3:DeleteObject per key of the body; the fixtures name them in "keys"
        return [Check("s3:DeleteObject", bucket, k) for k in req.get("keys", [])]
    raise ValueError(f"no MinIO bucket route for {m} {req['path']} {q}")


def condition_values(req: dict) -> dict[str, list[str]]:
    """getConditionValues: query parameters under their own names (s3:prefix reads "prefix")."""
    out: dict[str, list[str]] = {}
    for k, v in (req.get("headers") or {}).items():
        out.setdefault("-".join(p.capitalize() for p in k.split("-")), []).append(v)
    for k, v in (req.get("query") or {}).items():
        out.setdefault(k, []).append(v)
    return out


def _wild(pattern: str, name: str) -> bool:
    """minio/pkg wildcard.Match: '*' any run (including '/'), '?' exactly one character."""
    if pattern == "":
        return name == ""
    if pattern == "*":
        return True

    def deep(s: str, p: str) -> bool:
        while p:
            if p[0] == "*":
                return len(p) == 1 or deep(s, p[1:]) or (len(s) > 0 and deep(s[1:], p))
            if p[0] == "?":
                if not s:
                    return False
            elif not s or s[0] != p[0]:
                return False
            s, p = s[1:], p[1:]
        return not s
    return deep(name, pattern)


def _as_list(v) -> list:
    return [v] if isinstance(v, str) else list(v or [])


def _key_name(key: str) -> str:
    """condition KeyName.Name: "s3:prefix" -> "prefix", "aws:UserAgent" -> "UserAgent"."""
    head, sep, rest = key.partition(":")
    return rest if sep and head in ("s3", "aws", "jwt", "ldap", "sts", "svc") else key


def _values(values: dict, key: str) -> list[str]:
    name = _key_name(key)
    canon = "-".join(p.capitalize() for p in name.split("-"))
    return values[canon] if canon in values else values.get(name, [])


def _condition(op: str, key: str, want, values: dict) -> bool:
    qualifier, _, name = op.rpartition(":")
    got, want = _values(values, key), [str(w) for w in _as_list(want)]
    if name == "Null":
        return (len(got) == 0) == (str(want[0]).lower() == "true")
    negate = "Not" in name
    base = name.replace("Not", "")
    if base == "StringLike":
        if qualifier == "ForAllValues":
            res = all(any(_wild(w, g) for w in want) for g in got)
        else:
            res = any(any(_wild(w, g) for w in want) for g in got)
    elif base in ("StringEquals", "StringEqualsIgnoreCase"):
        fold = (lambda s: s.lower()) if base.endswith("IgnoreCase") else (lambda s: s)
        inter = {fold(g) for g in got} & {fold(w) for w in want}
        res = (not got or inter == {fold(g) for g in got}) if qualifier == "ForAllValues" else bool(inter)
    else:
        raise ValueError(f"condition operator {op!r} is not modelled")
    return not res if negate else res


def _statement_matches(st: dict, action: str, bucket: str, obj: str, values: dict) -> bool:
    actions = _as_list(st.get("Action"))
    if actions and not any(_wild(a, action) or (a == "s3:GetObjectVersion" and action == "s3:GetObject")
                           for a in actions):
        return False
    if any(_wild(a, action) for a in _as_list(st.get("NotAction"))):
        return False
    resource = f"{bucket}/{obj}" if obj else f"{bucket}/"
    clean = resource.rstrip("/") if resource != "/" else resource  # path.Clean
    pats = [r[len(ARN):] if r.startswith(ARN) else r for r in _as_list(st.get("Resource"))]
    if pats and not any(clean == p or _wild(p, resource) for p in pats):
        return False
    for op, kv in (st.get("Condition") or {}).items():
        for key, want in kv.items():
            if not _condition(op, key, want, values):
                return False
    return True


def is_allowed(policy: dict, check: Check, values: dict) -> bool:
    sts = policy.get("Statement", [])
    for st in sts:
        if st.get("Effect") == "Deny" and _statement_matches(st, check.action, check.bucket, check.object, values):
            return False
    return any(st.get("Effect") == "Allow" and _statement_matches(st, check.action, check.bucket, check.object, values)
               for st in sts)


def request_allowed(policy: dict, req: dict) -> bool:
    values = condition_values(req)
    return all(is_allowed(policy, c, values) for c in route(req))


def describe(req: dict) -> str:
    q = "&".join(f"{k}={v}" for k, v in sorted((req.get("query") or {}).items()))
    return f"{req['method']} {req['path']}{'?' + q if q else ''}"


def unused_grants(policy: dict, requests: list[dict]) -> list[str]:
    """Every (statement, action, resource) of the policy that no request needs: a request
    'uses' a grant when one of its checks names that action, matches that resource and
    meets the statement's conditions. Empty: the policy grants nothing the component does not do."""
    out = []
    for i, st in enumerate(policy.get("Statement", [])):
        if st.get("Effect") != "Allow":
            continue
        for action in _as_list(st.get("Action")):
            for res in _as_list(st.get("Resource")):
                single = {**st, "Action": [action], "Resource": [res]}
                used = any(_statement_matches(single, c.action, c.bucket, c.object, condition_values(r))
                           for r in requests for c in route(r))
                if not used:
                    out.append(f"statement {i}: {action} on {res}")
    return out
