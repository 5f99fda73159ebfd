#!/usr/bin/env bash
# Submit a draftforge run to a running Ray cluster as a Ray job.
#
#   launch/submit.sh recipe=llama70b run.output_dir=/mnt/shared/draftforge [more overrides...]
#
# RAY_ADDRESS: the cluster's job API (default http://127.0.0.1:8265, i.e. a local `ray start --head`).
# Use an absolute run.output_dir on shared storage: the job runs in a copy of this directory.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
# Ray >= 2.5x turns on token authentication for `ray start --head`; the job client must then send
# the token (kept in ~/.ray/auth_token), or the cluster must be started with RAY_AUTH_MODE=disabled.
if [[ -z "${RAY_AUTH_MODE:-}" && -f "$HOME/.ray/auth_token" ]]; then
  export RAY_AUTH_MODE=token
fi
exec ray job submit --working-dir . \
  --runtime-env-json '{"excludes": ["outputs/", ".venv/", "venv/", "wandb/", ".git/"]}' \
  -- python -m pipeline.main "$@"
