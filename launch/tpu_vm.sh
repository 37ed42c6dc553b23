#!/usr/bin/env bash
# Run a lag_jax job on a single-host TPU VM (v4-8, v5e-8, ...). On the VM:
#   git clone <this repo> lag_jax && cd lag_jax
#   launch/tpu_vm.sh configs/generate.py --workdir=$HOME/lag_runs/generate
# Installs JAX with TPU support on first use, then runs the job.
set -euo pipefail
config="${1:?usage: launch/tpu_vm.sh CONFIG[:ARG] [FLAGS...]}"; shift
cd "$(dirname "$0")/.."
if ! python -c "import jax; assert jax.default_backend() == 'tpu'" 2>/dev/null; then
  pip install -q -e . "jax[tpu]==0.10.2"
fi
exec python -m lag_jax.run --config="${config}" "$@"
