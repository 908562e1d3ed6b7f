#!/usr/bin/env bash
# `make up`: the platform on a local kind cluster. Idempotent: a second run creates nothing twice,
# rebuilds and reloads the image, and upgrades the releases in place.
#
#   1. prerequisites: docker (daemon reachable), kind (v0.27+), kubectl, helm, git; enough free memory
#   2. inotify limits KFP's pods need (set when root, else it stops with the command to run)
#   3. the kind cluster from infra/kind/cluster.yaml (created if absent)
#   4. the project image, built and loaded into the cluster's nodes
#   5. KubeRay operator (upstream helm chart, pinned)
#   6. Kubeflow Pipelines 2.17.0 standalone (platform-agnostic manifests) + a NodePort for its UI
#   7. the platform chart (infra/helm/mlops-platform), then waits for every rollout
#
# DRY_RUN=1 prints the actions instead of running them. Settings: see infra/kind/lib.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

log "prerequisites"
require_tools docker kind kubectl helm git
require_docker_daemon
require_kind_version

log "inotify limits (KFP's pods watch many files)"
require_inotify_limits

log "kind cluster '$CLUSTER_NAME'"
if cluster_exists; then
	log "cluster '$CLUSTER_NAME' exists: reusing it"
else
	require_memory
	run "$KIND" create cluster --name "$CLUSTER_NAME" --config "$KIND_CONFIG" --wait 180s
fi

log "project image $IMAGE"
# No provenance attestation or SBOM: with Docker 29's containerd image store they make `docker save` (which
# `kind load docker-image` runs) miss a manifest, and the load fails (kind#3795, kind#4236).
run "$DOCKER" build --provenance=false --sbom=false -t "$IMAGE" .
run "$KIND" load docker-image "$IMAGE" --name "$CLUSTER_NAME"
# The tag stays the same across rebuilds; the image id, passed to the chart as a pod annotation,
# makes a rebuilt image roll the Deployments.
if dry_run; then
	image_id="<image id of $IMAGE>"
else
	image_id="$("$DOCKER" image inspect --format '{{.Id}}' "$IMAGE")"
fi

log "KubeRay operator (chart $KUBERAY_CHART_VERSION)"
h upgrade --install kuberay-operator kuberay-operator \
	--repo "$KUBERAY_HELM_REPO" --version "$KUBERAY_CHART_VERSION" \
	--namespace "$KUBERAY_NAMESPACE" --create-namespace --wait --timeout 10m

log "Kubeflow Pipelines $KFP_VERSION (standalone, platform-agnostic)"
k apply -k "$KFP_MANIFESTS/cluster-scoped-resources?ref=$KFP_VERSION"
k wait --for condition=established --timeout=120s crd/applications.app.k8s.io
k apply -k "$KFP_MANIFESTS/env/platform-agnostic?ref=$KFP_VERSION"
# The UI on a NodePort, mapped to localhost:8888 by cluster.yaml (the upstream Service is ClusterIP).
run_with_input "apiVersion: v1
kind: Service
metadata:
  name: ml-pipeline-ui-nodeport
  namespace: $KFP_NAMESPACE
  labels:
    app.kubernetes.io/managed-by: mlops-template-up-sh
spec:
  type: NodePort
  selector:
    app: ml-pipeline-ui
  ports:
    - name: http
      port: 80
      targetPort: 3000
      nodePort: 30888" "$KUBECTL" --context "$KUBE_CONTEXT" apply -f -
# KFP's pods restart a few times while MySQL and SeaweedFS come up: that is expected.
k -n "$KFP_NAMESPACE" wait --for=condition=Available deployment --all --timeout=20m

# A laptop cluster runs the `fast` rollout spec (phases of seconds), so that `make scenario` decides within
# the scenarios' time bounds; ROLLOUT_SPEC=default gives the production timings.
log "platform chart $CHART_DIR -> namespace $PLATFORM_NAMESPACE"
h upgrade --install "$HELM_RELEASE" "$CHART_DIR" \
	--namespace "$PLATFORM_NAMESPACE" --create-namespace \
	--set-string "image.repository=${IMAGE%:*}" \
	--set-string "image.tag=${IMAGE##*:}" \
	--set-string "image.buildId=$image_id" \
	--set-string "kfp.namespace=$KFP_NAMESPACE" \
	--set-string "platform.rolloutSpec=${ROLLOUT_SPEC:-fast}" \
	--set-string "networkPolicy.rayOperatorNamespace=$KUBERAY_NAMESPACE" \
	${HELM_EXTRA_ARGS:-} \
	--wait --timeout 15m

log "rollouts"
k -n "$PLATFORM_NAMESPACE" rollout status statefulset/postgres --timeout=10m
k -n "$PLATFORM_NAMESPACE" wait --for=condition=Available deployment --all --timeout=10m

# Pipeline pods run in the KFP namespace, and a pod reads secrets only from its own namespace: the steps
# (MinIO and MLflow credentials, the control-plane token) need a copy of the platform secret there.
log "platform secret for pipeline pods in $KFP_NAMESPACE"
if dry_run; then
	run "$KUBECTL" --context "$KUBE_CONTEXT" -n "$PLATFORM_NAMESPACE" get secret "$SECRET_NAME" -o json
	run "$KUBECTL" --context "$KUBE_CONTEXT" -n "$KFP_NAMESPACE" apply -f -
else
	secret_json=$("$KUBECTL" --context "$KUBE_CONTEXT" -n "$PLATFORM_NAMESPACE" get secret "$SECRET_NAME" -o json)
	copied=$(printf '%s' "$secret_json" | python3 -c '
import json, sys
secret = json.load(sys.stdin)
secret["metadata"] = {"name": secret["metadata"]["name"], "namespace": sys.argv[1]}
print(json.dumps(secret))' "$KFP_NAMESPACE")
	run_with_input "$copied" "$KUBECTL" --context "$KUBE_CONTEXT" -n "$KFP_NAMESPACE" apply -f -
fi

if dry_run; then
	log "dry run: nothing was changed"
	exit 0
fi
cat <<EOF

The platform is up (kind cluster '$CLUSTER_NAME', namespace '$PLATFORM_NAMESPACE'):
  gateway    $GATEWAY_URL/v1/score   (health: $GATEWAY_URL/healthz)
  MLflow     $MLFLOW_URL
  KFP UI     $KFP_UI_URL   (or: kubectl -n $KFP_NAMESPACE port-forward svc/ml-pipeline-ui 8888:80)
  Grafana    $GRAFANA_URL   (user admin; password: kubectl --context $KUBE_CONTEXT -n $PLATFORM_NAMESPACE get secret $SECRET_NAME -o jsonpath='{.data.grafana-admin-password}' | base64 -d)
Next: make run   (a training pipeline run on KFP)   |   make scenario NAME=worse-quality   |   make status
EOF
