#!/bin/sh
# KServe's S3 credentials for the InferenceService: the SAME read-only MinIO user as Triton
# (k8s/base/secrets/triton.env: read-only on models/serving/), under the key names KServe
# v0.19.0's storage initializer reads (config/configmap/inferenceservice.yaml credentials.s3:
# s3AccessKeyIDName AWS_ACCESS_KEY_ID, s3SecretAccessKeyName AWS_SECRET_ACCESS_KEY).
# Run after k8s/base/secrets/generate.sh; writes kserve-s3.env here (git-ignored, mode 600).
set -eu
cd "$(dirname "$0")"
umask 077
src=../../../base/secrets/triton.env
[ -e "$src" ] || { echo "missing $src: run k8s/base/secrets/generate.sh first" >&2; exit 1; }
key=$(sed -n 's/^access-key=//p' "$src")
secret=$(sed -n 's/^secret-key=//p' "$src")
printf 'AWS_ACCESS_KEY_ID=%s\nAWS_SECRET_ACCESS_KEY=%s\n' "$key" "$secret" > kserve-s3.env
echo "wrote $PWD/kserve-s3.env (Triton's read-only user)"
