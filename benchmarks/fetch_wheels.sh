#!/usr/bin/env bash
# Download, on a machine with network, the wheels benchmarks/accelerator_check.sh installs on
# an accelerator machine without network (jax, flax, optax, orbax, chex, transformers, torch,
# peft, accelerate, pyarrow and tqdm are preinstalled there). They go to benchmarks/wheels/
# (git-ignored) and travel with the working tree; keep the folder under 64 MiB.
#
#   bash benchmarks/fetch_wheels.sh     # env: PY_VERSION=3.12 PLATFORM=manylinux_2_28_x86_64 WHEELS=benchmarks/wheels
#
# trl<1.13 (1.13 removed the PPO trainer) with datasets and its dependencies that may be
# missing there (dill, multiprocess, xxhash, pandas, ...); tensorboardX, gymnax and their
# pure-Python dependencies for the rest of the project; setuptools for the editable install.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
dest=${WHEELS:-benchmarks/wheels}
mkdir -p "$dest"
"$PYTHON" -m pip download --no-deps --only-binary=:all: --dest "$dest" \
  --python-version "${PY_VERSION:-3.12}" --implementation cp \
  --platform "${PLATFORM:-manylinux_2_28_x86_64}" --platform manylinux2014_x86_64 --platform any \
  "trl>=0.20,<1.13" datasets dill multiprocess xxhash fsspec pandas python-dateutil tzdata \
  tensorboardX gymnax gymnasium cloudpickle farama-notifications seaborn six setuptools
du -sh "$dest"
