#!/usr/bin/env bash
# Run a lag_jax job on this machine (CPU or a local accelerator).
#   launch/local.sh configs/generate.py --workdir=/tmp/lag_generate
#   launch/local.sh configs/generate.py:tiny --config.generation.max_new_tokens=4
set -euo pipefail
config="${1:?usage: launch/local.sh CONFIG[:ARG] [FLAGS...]}"; shift
cd "$(dirname "$0")/.."
exec python -m lag_jax.run --config="${config}" "$@"
