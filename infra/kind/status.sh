#!/usr/bin/env bash
# `make status`: what runs where, and whether each UI answers.
#   nodes; helm releases; the platform's pods, services, volumes and network policies; Ray jobs;
#   KFP's and KubeRay's pods; then one health request per host URL.
# DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

require_tools docker kind kubectl helm
if ! dry_run; then
	require_docker_daemon
	require_cluster
fi

k get nodes -o wide
h list --all-namespaces
k -n "$PLATFORM_NAMESPACE" get pods,services,persistentvolumeclaims,networkpolicies -o wide
k -n "$PLATFORM_NAMESPACE" get rayjobs.ray.io,rayclusters.ray.io --ignore-not-found
k -n "$KFP_NAMESPACE" get pods
k -n "$KUBERAY_NAMESPACE" get pods

check_url() {
	local name=$1 url=$2 code
	if dry_run; then
		run curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$url"
		return 0
	fi
	code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$url" || true)"
	printf '  %-9s %-40s %s\n' "$name" "$url" "$([[ "$code" == 200 ]] && echo ok || echo "not answering (HTTP ${code:-none})")"
}
echo "host endpoints:"
check_url gateway "$GATEWAY_URL/healthz"
check_url MLflow "$MLFLOW_URL/health"
check_url "KFP UI" "$KFP_UI_URL/"
check_url Grafana "$GRAFANA_URL/api/health"
