#!/usr/bin/env bash
# The accelerator check in one command, from a fresh copy of the repository on a machine with
# jax (CUDA), flax, optax, orbax, chex, transformers and torch preinstalled and no network:
#
#   bash benchmarks/accelerator_check.sh [--out DIR] [benchmarks/accelerator_check.py options]
#
# 1. installs the wheels in benchmarks/wheels/ (made by benchmarks/fetch_wheels.sh) whose
#    distribution is not installed yet: the preinstalled stack is never replaced;
# 2. installs this project without dependencies (pip install --no-deps --no-build-isolation -e .);
#    if that fails, the repository root on PYTHONPATH does the same job;
# 3. runs benchmarks/accelerator_check.py, which writes accelerator_check.json and
#    accelerator_check.md to --out (default: $OUT, else ./accelerator_check_out).
#    setuptools older than 77 (pyproject.toml's build requirement) counts as missing.
# CHECK_TIMEOUT (seconds, default 470) stops the Python driver; the sections it finished are
# already in the JSON file. INSTALL=0 skips steps 1 and 2 (a dry run in a shared environment).
# PYTHON (default python3) and WHEELS (default benchmarks/wheels) may be set.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-benchmarks/wheels}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

has_pip() { "$PYTHON" -m pip --version > /dev/null 2>&1; }
# installed NAME: the distribution is there (setuptools: at the version pyproject.toml builds with)
installed() {
  "$PYTHON" - "$1" 2> /dev/null << 'PY'
import importlib.metadata as m, sys
version = m.version(sys.argv[1])
if sys.argv[1] == "setuptools" and int(version.split(".")[0]) < 77:
    sys.exit(1)
PY
}

if [ "${INSTALL:-1}" = 1 ] && [ -d "$WHEELS" ] && compgen -G "$WHEELS/*.whl" > /dev/null && has_pip; then
  for wheel in "$WHEELS"/*.whl; do  # one at a time: a wheel that does not fit skips alone
    name=$(basename "$wheel")
    name=${name%%-*}
    if installed "$name"; then continue; fi
    if "$PYTHON" -m pip install --quiet --no-deps --no-index "$wheel"; then
      echo "installed carried wheel ${wheel##*/}"
    else
      echo "warning: ${wheel##*/} did not install; the sections that need it record why" >&2
    fi
  done
fi

log=$(mktemp)
if [ "${INSTALL:-1}" != 1 ]; then
  echo "INSTALL=${INSTALL}: nothing installed; rlhf_jax from PYTHONPATH=$PWD"
elif has_pip && "$PYTHON" -m pip install --no-deps --no-build-isolation -e . > "$log" 2>&1; then
  echo "installed rlhf_jax (editable, no dependencies)"
else
  tail -5 "$log" >&2
  echo "warning: pip install -e . failed; rlhf_jax from PYTHONPATH=$PWD" >&2
fi

driver=("$PYTHON" benchmarks/accelerator_check.py "$@")  # --out defaults to $OUT
if command -v timeout > /dev/null; then
  exec timeout -k 10 "${CHECK_TIMEOUT:-470}" "${driver[@]}"
fi
exec "${driver[@]}"
