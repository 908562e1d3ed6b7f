#!/usr/bin/env bash
# `make scenario NAME=...`: run one rollback scenario (scenarios/NAME.yaml) against the kind platform.
#   The gateway and MLflow are reached on their NodePorts (localhost:8710, :8750); the control plane,
#   the controller and the KFP API through port-forwards (they are not exposed on the host); the
#   control-plane token comes from the chart's generated secret.
# DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [[ $# -lt 1 || -z "$1" ]]; then
	echo "usage: $0 NAME [mlops scenario options]   (NAME: a file in scenarios/, e.g. worse-quality)" >&2
	exit 2
fi
name="$1"
shift

require_tools kubectl
if ! dry_run; then
	require_tools docker kind
	require_docker_daemon
	require_cluster
fi
cli="$(mlops_cli)"

trap stop_port_forwards EXIT
port_forward "$PLATFORM_NAMESPACE" svc/control-plane "$CONTROL_PLANE_PORT" 8700
port_forward "$PLATFORM_NAMESPACE" svc/controller "$CONTROLLER_PORT" 8730
port_forward "$KFP_NAMESPACE" svc/ml-pipeline "$KFP_API_PORT" 8888
# The runner reads each slot's loaded version and switches scenario faults on and off there.
port_forward "$PLATFORM_NAMESPACE" svc/slot-a "$SLOT_A_PORT" 8721
port_forward "$PLATFORM_NAMESPACE" svc/slot-b "$SLOT_B_PORT" 8722
export_cluster_env
export MLOPS_SLOT_A_URL="http://127.0.0.1:${SLOT_A_PORT}" MLOPS_SLOT_B_URL="http://127.0.0.1:${SLOT_B_PORT}"
MLOPS_CONTROL_PLANE_TOKEN="$(control_plane_token)"
export MLOPS_CONTROL_PLANE_TOKEN
# The scenario's traffic posts labels: the gateway accepts them with the labels token only.
MLOPS_LABELS_TOKEN="$(secret_value labels-token)"
export MLOPS_LABELS_TOKEN
run "$cli" scenario "$name" --target kind "$@"
