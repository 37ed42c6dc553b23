#!/usr/bin/env bash
# Run a lag_jax job on every worker of a TPU pod slice (v4-32, v5e-16, ...) at once,
# from a machine with gcloud. Each worker checks out the same commit, installs on
# first use and runs launch/tpu_vm.sh with --distributed=on: JAX finds the other
# workers itself, and process 0 (worker 0) writes the outputs, on its own disk.
#   REPO=https://github.com/you/lag_jax.git \
#   launch/tpu_pod.sh my-v4-32 us-central2-b configs/generate.py \
#       --config.library=/path/on/every/worker --config.mesh.adapter=-1 \
#       --workdir=/tmp/lag_runs/generate
# which runs (REV defaults to this checkout's HEAD commit):
#   gcloud compute tpus tpu-vm ssh my-v4-32 --zone=us-central2-b --worker=all --command='
#     set -e; test -d lag_jax || git clone "$REPO" lag_jax; cd lag_jax;
#     git fetch -q origin; git checkout -q REV;
#     launch/tpu_vm.sh configs/generate.py --distributed=on --config.library=... '
# so that each worker ends in
#   python -m lag_jax.run --config=configs/generate.py --distributed=on --config.library=...
# Then fetch the outputs from worker 0:
#   gcloud compute tpus tpu-vm scp --zone=us-central2-b --worker=0 \
#       my-v4-32:/tmp/lag_runs/generate/generations.json .
# Every worker reads the checkpoint and library from its own disk (or the same
# network mount). PROJECT sets gcloud's --project; DRY_RUN=1 prints the gcloud
# command instead of running it.
set -euo pipefail
usage="usage: REPO=GIT_URL launch/tpu_pod.sh TPU_NAME ZONE CONFIG[:ARG] [FLAGS...]"
tpu="${1:?${usage}}"
zone="${2:?${usage}}"
config="${3:?${usage}}"
shift 3
cd "$(dirname "$0")/.."
repo="${REPO:-$(git remote get-url origin 2>/dev/null || true)}"
if [[ -z "${repo}" ]]; then
  echo "set REPO to a git URL the workers can clone (this checkout has no origin)" >&2
  exit 2
fi
rev="${REV:-$(git rev-parse HEAD)}"

# The remote command, each argument quoted for the workers' shell.
job=$(printf ' %q' launch/tpu_vm.sh "${config}" --distributed=on "$@")
remote="set -e; test -d lag_jax || git clone -q $(printf '%q' "${repo}") lag_jax; cd lag_jax;"
remote+=" git fetch -q origin; git checkout -q $(printf '%q' "${rev}");${job}"

cmd=(gcloud compute tpus tpu-vm ssh "${tpu}" --zone="${zone}" --worker=all)
if [[ -n "${PROJECT:-}" ]]; then
  cmd+=(--project="${PROJECT}")
fi
cmd+=(--command="${remote}")
if [[ -n "${DRY_RUN:-}" ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
