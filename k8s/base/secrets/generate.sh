#!/bin/sh
# Fresh random credentials for one install: MinIO's root user, one MinIO user per component
# (pipeline steps, trainer, Triton, TensorBoard), and the key of Triton's restricted model-repository
# protocol (triton-control: Triton checks it, the pipeline's deploy step sends it).
# Writes *.env beside this script (git-ignored, mode 600);
# existing files are kept, so rerunning never changes a running install's keys.
set -eu
cd "$(dirname "$0")"
umask 077
rand() { LC_ALL=C tr -dc 'A-Za-z0-9' </dev/urandom | head -c "$1"; }
for name in minio-root pipeline trainer triton tensorboard triton-control; do
  if [ -e "$name.env" ]; then echo "keeping $PWD/$name.env"; continue; fi
  if [ "$name" = minio-root ]; then
    printf 'MINIO_ROOT_USER=root-%s\nMINIO_ROOT_PASSWORD=%s\n' "$(rand 8)" "$(rand 40)" > "$name.env"
  elif [ "$name" = triton-control ]; then
    printf 'key=%s\n' "$(rand 64)" > "$name.env"
  else
    printf 'access-key=%s-%s\nsecret-key=%s\n' "$name" "$(rand 8)" "$(rand 40)" > "$name.env"
  fi
  echo "wrote $PWD/$name.env"
done
