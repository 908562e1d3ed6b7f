#!/usr/bin/env bash
# `make down`: delete the kind cluster `make up` created (everything in it goes with it: KFP, the
# platform, its volumes). The project image stays in the local Docker image store.
# DRY_RUN=1 prints the actions instead of running them.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

require_tools docker kind
require_docker_daemon

if cluster_exists; then
	run "$KIND" delete cluster --name "$CLUSTER_NAME"
else
	log "kind cluster '$CLUSTER_NAME' does not exist: nothing to delete"
	# Under DRY_RUN, show what a real `down` runs when the cluster is there.
	if dry_run; then
		run "$KIND" delete cluster --name "$CLUSTER_NAME"
	fi
fi
