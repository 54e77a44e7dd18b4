#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM slice (multi-host), resuming from WORKDIR.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#   launch/tpu_pod.sh my-v6e-64 europe-west4-a configs/imagenet64_620m.py gs://bucket/run \
#       --config.data.data_dir=gs://bucket/tfds
#
# Copies this checkout to every worker, installs it with the TPU extra (the TPU runtime and
# gcsfs, so WORKDIR and data_dir can be gs:// URLs) and the data extra, and
# starts the same command on all of them; asyncpatch_jax.main then calls
# jax.distributed.initialize() (ASYNCPATCH_DISTRIBUTED=auto) and each host reads its
# own share of every batch. Re-running the script after a preemption resumes from the
# latest checkpoint in WORKDIR (use a gs:// path that all workers share).
set -euo pipefail
if [[ $# -lt 4 ]]; then
  sed -n '2,13p' "$0"
  exit 2
fi
TPU=$1 ZONE=$2 CONFIG=$3 WORKDIR=$4
shift 4
REPO=$(cd "$(dirname "$0")/.." && pwd)
gcloud compute tpus tpu-vm scp --zone="$ZONE" --worker=all --recurse "$REPO" "$TPU":~/asyncpatch_jax
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  set -e; cd ~/asyncpatch_jax
  python3 -m pip install -q -e '.[tpu,data]'
  ASYNCPATCH_DISTRIBUTED=auto python3 -m asyncpatch_jax.main --config=$CONFIG --workdir=$WORKDIR $*"
