#!/usr/bin/env bash
# One host, all its accelerators (or its CPU): the training command as is.
#
#   launch/local.sh [train flags...]
#   launch/local.sh --config=configs/small.py --workdir=/tmp/emo_small --config.train.steps=500
#
# Without flags it trains configs/tiny.py into $WORKDIR (default /tmp/emo_tiny). Rerun the same
# command to resume. Environment: PYTHON (default python), WORKDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if [ $# -eq 0 ]; then
  set -- --config=configs/tiny.py --workdir="${WORKDIR:-/tmp/emo_tiny}"
fi
exec "$PYTHON" -m emo_jax.train "$@"
