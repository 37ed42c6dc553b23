#!/usr/bin/env bash
# Run a lag_jax job on a single-host TPU VM (v4-8, v5e-8, ...). On the VM:
#   git clone <this repo> lag_jax && cd lag_jax
#   launch/tpu_vm.sh configs/generate.py --workdir=$HOME/lag_runs/generate
# The library split over the VM's chips (expert-parallel routing):
#   launch/tpu_vm.sh configs/generate.py --config.library=/path/to/library \
#       --config.mesh.adapter=-1 --workdir=$HOME/lag_runs/generate
# Installs lag_jax and JAX with TPU support on first use, then runs exactly:
#   python -m lag_jax.run --config=CONFIG [FLAGS...]
# launch/tpu_pod.sh runs this script on every worker of a pod slice at once (with
# --distributed=on, so that the workers find each other).
set -euo pipefail
config="${1:?usage: launch/tpu_vm.sh CONFIG[:ARG] [FLAGS...]}"
shift
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
# Checks that lag_jax and libtpu are installed without starting the TPU runtime (on a pod slice a
# lone process that starts it would wait for the other workers).
check="import importlib.metadata as m, importlib.util as u; m.version('lag_jax'); assert u.find_spec('libtpu')"
if ! "${python}" -c "${check}" 2>/dev/null; then
  "${python}" -m pip install -q -e . "jax[tpu]==0.10.2"
fi
exec "${python}" -m lag_jax.run --config="${config}" "$@"
