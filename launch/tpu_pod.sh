#!/usr/bin/env bash
# A Cloud TPU VM pod slice: the same training command on every worker, over
# `gcloud compute tpus tpu-vm ssh --worker=all`.
#
#   launch/tpu_pod.sh TPU_NAME ZONE [train flags...]
#   PROJECT=my-proj SETUP='pip install -e .' launch/tpu_pod.sh my-v5p-64 us-east5-a \
#       --config=configs/emo_1b14b.py --workdir=/mnt/shared/emo_1b14b \
#       --config.data.train_sources=/mnt/shared/data/train
#
# The workers must already hold this repository at $REPO_DIR (e.g. copied with
# `gcloud compute tpus tpu-vm scp --worker=all`), and the workdir and data must be on a
# filesystem every worker sees (NFS, Filestore, a gcsfuse mount).
# Environment:
#   PROJECT   gcloud project (default: gcloud's configured one)
#   REPO_DIR  the repository on the workers (default: emo_jax, relative to the home directory)
#   SETUP     a command run first on every worker, e.g. 'pip install -e .[hf]' (default: none)
#   PYTHON    interpreter on the workers (default python3)
#   PORT      coordinator port on worker 0 (default 8476)
# Every worker gets JAX_COORDINATOR_ADDRESS (worker 0's internal IP), JAX_NUM_PROCESSES (the
# number of workers) and JAX_PROCESS_ID (its agent-worker-number from the metadata server),
# which emo_jax.parallel.initialize_distributed reads. Rerun the same command to resume.
set -euo pipefail
TPU=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE [train flags...]}
ZONE=${2:?usage: launch/tpu_pod.sh TPU_NAME ZONE [train flags...]}
shift 2
project=()
[ -n "${PROJECT:-}" ] && project=(--project="$PROJECT")
read -r -a ips <<< "$(gcloud compute tpus tpu-vm describe "$TPU" --zone="$ZONE" "${project[@]}" \
  --format='value(networkEndpoints[].ipAddress)' | tr ';,' '  ')"
[ "${#ips[@]}" -ge 1 ] || { echo "error: no workers found for TPU $TPU in $ZONE" >&2; exit 2; }
flags=$(printf ' %q' "$@")
worker_id='$(curl -s -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)'
remote="cd ${REPO_DIR:-emo_jax} && ${SETUP:+$SETUP && }"
remote+="export JAX_COORDINATOR_ADDRESS=${ips[0]}:${PORT:-8476} JAX_NUM_PROCESSES=${#ips[@]} "
remote+="JAX_PROCESS_ID=$worker_id && ${PYTHON:-python3} -m emo_jax.train$flags"
exec gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" "${project[@]}" --worker=all \
  --command="$remote"
