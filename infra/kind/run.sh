#!/usr/bin/env bash
# `make run`: submit a training pipeline run to KFP on the kind cluster and follow it.
#   The KFP API (svc/ml-pipeline:8888) is port-forwarded to localhost:$KFP_API_PORT (18888) for the
#   duration of the run; MLflow is reached on its NodePort (localhost:8750).
#   Extra arguments go to `mlops run` (e.g. `make run RUN_ARGS="--generate 50000"`).
# DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

require_tools kubectl
if ! dry_run; then
	require_tools docker kind
	require_docker_daemon
	require_cluster
fi
cli="$(mlops_cli)"

trap stop_port_forwards EXIT
port_forward "$KFP_NAMESPACE" svc/ml-pipeline "$KFP_API_PORT" 8888
export_cluster_env
run "$cli" run --target kind "$@"
