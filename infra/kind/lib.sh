# shellcheck shell=bash
# Shared by the infra/kind scripts (sourced, never run): settings, DRY_RUN, prerequisite checks,
# port-forwards. Every setting can be overridden from the environment.
#
# DRY_RUN=1: actions (anything that changes the machine or the cluster) are printed, one `+ command`
# line each on stdout, instead of run. Read-only checks (is docker there, does the cluster exist) still
# run, so a dry run also tells whether the real run would get past its prerequisites.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"

CLUSTER_NAME="${KIND_CLUSTER_NAME:-mlops}"
KUBE_CONTEXT="kind-${CLUSTER_NAME}"
KIND_CONFIG="infra/kind/cluster.yaml"
PLATFORM_NAMESPACE="${PLATFORM_NAMESPACE:-mlops}"
HELM_RELEASE="${HELM_RELEASE:-mlops}"
CHART_DIR="infra/helm/mlops-platform"
IMAGE="${IMAGE:-mlops-template:0.1.0}"
SECRET_NAME="${SECRET_NAME:-mlops-platform-secrets}"

# Upstream pins (bump deliberately; tests check them).
KFP_VERSION="2.17.0"
KFP_NAMESPACE="kubeflow"
KFP_MANIFESTS="github.com/kubeflow/pipelines/manifests/kustomize"
KUBERAY_CHART_VERSION="1.7.0"
KUBERAY_HELM_REPO="https://ray-project.github.io/kuberay-helm/"
KUBERAY_NAMESPACE="${KUBERAY_NAMESPACE:-kuberay-system}"

# Host ports: the NodePorts mapped in cluster.yaml, and local ends of port-forwards.
GATEWAY_URL="http://localhost:8710"
MLFLOW_URL="http://localhost:8750"
KFP_UI_URL="http://localhost:8888"
GRAFANA_URL="http://localhost:3000"
KFP_API_PORT="${KFP_API_PORT:-18888}"
CONTROL_PLANE_PORT="${CONTROL_PLANE_PORT:-18700}"
CONTROLLER_PORT="${CONTROLLER_PORT:-18730}"
SLOT_A_PORT="${SLOT_A_PORT:-18721}"
SLOT_B_PORT="${SLOT_B_PORT:-18722}"

MIN_MEMORY_GIB="${MIN_MEMORY_GIB:-8}"
DRY_RUN="${DRY_RUN:-0}"

# The tools, overridable (a wrapper, another path, a fake for tests).
DOCKER="${DOCKER_BIN:-docker}"
KIND="${KIND_BIN:-kind}"
KUBECTL="${KUBECTL_BIN:-kubectl}"
HELM="${HELM_BIN:-helm}"
GIT="${GIT_BIN:-git}" # kubectl apply -k github.com/... clones with git

# The oldest kind that runs the pinned node image: it reads containerd's config version 3 from kind v0.27 on
# (and enforces NetworkPolicies from v0.24).
MIN_KIND_VERSION="0.27.0"

# inotify limits KFP's pods need ("too many open files" below them). INOTIFY_SYSCTL_DIR: where they are read.
INOTIFY_LIMITS="fs.inotify.max_user_watches=524288 fs.inotify.max_user_instances=512"
INOTIFY_SYSCTL_DIR="${INOTIFY_SYSCTL_DIR:-/proc/sys}"

log() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
	printf 'error: %s\n' "$*" >&2
	exit 1
}
dry_run() { [[ "$DRY_RUN" == "1" ]]; }

# A command line as one would type it: plain words bare, anything else single-quoted.
render_command() {
	local word out=""
	for word in "$@"; do
		if [[ "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
			out+="$word "
		else
			out+="'${word//\'/\'\\\'\'}' "
		fi
	done
	printf '%s' "${out% }"
}

# An action: printed under DRY_RUN=1, else echoed to stderr and run.
run() {
	if dry_run; then
		printf '+ %s\n' "$(render_command "$@")"
	else
		printf '+ %s\n' "$(render_command "$@")" >&2
		"$@"
	fi
}

# An action reading a document on stdin (the first argument): under DRY_RUN=1 the document is shown too.
run_with_input() {
	local input=$1
	shift
	if dry_run; then
		printf '+ %s <<EOF\n%s\nEOF\n' "$(render_command "$@")" "$input"
	else
		printf '+ %s <<EOF ... EOF\n' "$(render_command "$@")" >&2
		printf '%s\n' "$input" | "$@"
	fi
}

# kubectl / helm always name the kind cluster's context: never act on whatever context is current.
k() { run "$KUBECTL" --context "$KUBE_CONTEXT" "$@"; }
h() { run "$HELM" --kube-context "$KUBE_CONTEXT" "$@"; }

require_tools() {
	local tool var hint
	for tool in "$@"; do
		case "$tool" in
		docker) var=DOCKER hint="install Docker Engine or Docker Desktop: https://docs.docker.com/get-docker/" ;;
		kind) var=KIND hint="install kind v0.31+: https://kind.sigs.k8s.io/docs/user/quick-start/#installation" ;;
		kubectl) var=KUBECTL hint="install kubectl 1.30-1.32: https://kubernetes.io/docs/tasks/tools/" ;;
		helm) var=HELM hint="install helm v3.14+ or v4: https://helm.sh/docs/intro/install/" ;;
		git) var=GIT hint="install git: kubectl fetches the KFP manifests from github.com with it (apt-get install git, brew install git)" ;;
		*) die "internal: unknown tool $tool" ;;
		esac
		command -v "${!var}" >/dev/null 2>&1 || die "$tool not found (looked for '${!var}' on PATH): $hint"
	done
}

# "0.31.0" from `kind version` ("kind v0.31.0 go1.25.5 linux/amd64"); empty when it cannot be read.
kind_version() {
	"$KIND" version 2>/dev/null | sed -n 's/^kind v\([0-9][0-9]*\.[0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n 1
}

# version_at_least HAVE WANT: true when HAVE >= WANT (dotted numbers).
version_at_least() {
	local have=$1 want=$2 h w i
	for i in 1 2 3; do
		h="$(echo "$have" | cut -d. -f"$i")"
		w="$(echo "$want" | cut -d. -f"$i")"
		h=${h:-0} w=${w:-0}
		((10#$h > 10#$w)) && return 0
		((10#$h < 10#$w)) && return 1
	done
	return 0
}

require_kind_version() {
	local have
	have="$(kind_version)"
	[[ -n "$have" ]] || die "cannot read the kind version ('$KIND version' printed: $("$KIND" version 2>&1 | head -n 1)); kind v$MIN_KIND_VERSION or newer is needed"
	version_at_least "$have" "$MIN_KIND_VERSION" ||
		die "kind v$have is too old: v$MIN_KIND_VERSION or newer is needed (the pinned node image needs containerd config v3 support; NetworkPolicies need v0.24+)." \
			"Upgrade: https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
	log "kind v$have (need v$MIN_KIND_VERSION+)"
}

# The inotify limits: set them when root, else stop (before any cluster is made) with the exact command.
require_inotify_limits() {
	local setting key want have missing=()
	if [[ "$(uname -s)" != "Linux" ]]; then
		log "not Linux: the limits live in Docker's VM (Docker Desktop's defaults are high enough)"
		return 0
	fi
	for setting in $INOTIFY_LIMITS; do
		key="${setting%%=*}"
		want="${setting#*=}"
		have="$(cat "$INOTIFY_SYSCTL_DIR/${key//.//}" 2>/dev/null || echo 0)"
		if ((have >= want)); then
			continue
		elif [[ "$(id -u)" == "0" ]]; then
			run sysctl -w "$key=$want"
		else
			missing+=("$key=$want")
			warn "$key is $have, KFP needs $want"
		fi
	done
	if ((${#missing[@]} > 0)); then
		die "the inotify limits are too low for KFP (its pods fail with \"too many open files\"). Run:" \
			"sudo sysctl -w ${missing[*]}" \
			"and, to keep them after a reboot: printf '%s\\n' ${missing[*]} | sudo tee /etc/sysctl.d/99-kind-inotify.conf;" \
			"then run \`make up\` again"
	fi
}

require_docker_daemon() {
	"$DOCKER" info >/dev/null 2>&1 ||
		die "the Docker daemon is not reachable ('$DOCKER info' failed): start Docker, or on Linux add yourself to the docker group"
}

# Free memory, in KiB: MemAvailable on Linux; elsewhere Docker runs in a VM and the VM's memory counts.
free_memory_kib() {
	local bytes
	if [[ "$(uname -s)" == "Linux" && -r /proc/meminfo ]]; then
		awk '/^MemAvailable:/ {print $2}' /proc/meminfo
		return
	fi
	bytes="$("$DOCKER" info --format '{{.MemTotal}}' 2>/dev/null || true)"
	[[ "$bytes" =~ ^[0-9]+$ ]] && echo $((bytes / 1024))
}

require_memory() {
	local kib need_kib
	kib="$(free_memory_kib)"
	need_kib=$((MIN_MEMORY_GIB * 1024 * 1024))
	if [[ -z "$kib" ]]; then
		warn "cannot tell how much memory is free; the platform needs about ${MIN_MEMORY_GIB} GiB"
		return 0
	fi
	if ((kib < need_kib)); then
		die "$(awk -v k="$kib" 'BEGIN {printf "%.1f", k / 1048576}') GiB of memory free, the kind platform needs at least ${MIN_MEMORY_GIB} GiB" \
			"(KFP ~2.5 GiB, the platform chart ~4.5 GiB requested, a Ray training job ~1.5 GiB)." \
			"Close other programs or give Docker more memory; MIN_MEMORY_GIB=N lowers the bar at your own risk."
	fi
	log "memory: $(awk -v k="$kib" 'BEGIN {printf "%.1f", k / 1048576}') GiB free (need ${MIN_MEMORY_GIB} GiB)"
}

cluster_exists() { "$KIND" get clusters 2>/dev/null | grep -qx "$CLUSTER_NAME"; }

require_cluster() {
	cluster_exists || die "kind cluster '$CLUSTER_NAME' does not exist: run \`make up\` first"
}

# The project CLI: $MLOPS_CLI, else the repo's virtualenv, else PATH.
mlops_cli() {
	if [[ -n "${MLOPS_CLI:-}" ]]; then
		echo "$MLOPS_CLI"
	elif [[ -x "$REPO_ROOT/.venv/bin/mlops" ]]; then
		echo "$REPO_ROOT/.venv/bin/mlops"
	elif command -v mlops >/dev/null 2>&1; then
		command -v mlops
	elif dry_run; then
		echo mlops
	else
		die "the mlops CLI was not found: run \`make setup\` first (or set MLOPS_CLI)"
	fi
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

PORT_FORWARD_PIDS=()
PORT_FORWARD_LOGS=()

stop_port_forwards() {
	local pid
	# (the ${a[@]+...} form: bash 3.2, macOS's, treats an empty array as unset under `set -u`)
	for pid in ${PORT_FORWARD_PIDS[@]+"${PORT_FORWARD_PIDS[@]}"}; do
		kill "$pid" 2>/dev/null || true # the supervisor stops its kubectl on TERM
	done
	for pid in ${PORT_FORWARD_PIDS[@]+"${PORT_FORWARD_PIDS[@]}"}; do
		wait "$pid" 2>/dev/null || true
	done
	if ((${#PORT_FORWARD_LOGS[@]} > 0)); then
		rm -f "${PORT_FORWARD_LOGS[@]}"
	fi
	PORT_FORWARD_PIDS=()
	PORT_FORWARD_LOGS=()
}

# port_forward NAMESPACE TARGET LOCAL_PORT REMOTE_PORT: in the background until the script exits, and
# re-opened whenever it ends: `kubectl port-forward` exits when the pod behind it restarts or goes away
# (a KFP API server restart during `make run` would otherwise cut the run off its API).
# (Port-forwarded traffic enters the pod from its own network namespace: NetworkPolicies do not apply,
# which is why the CLI on the host reaches the control plane and the controller this way.)
PORT_FORWARD_RETRY_S="${PORT_FORWARD_RETRY_S:-1}"

port_forward() {
	local namespace=$1 target=$2 local_port=$3 remote_port=$4 logfile
	if dry_run; then
		printf '+ %s &\n' "$(render_command "$KUBECTL" --context "$KUBE_CONTEXT" -n "$namespace" port-forward "$target" "$local_port:$remote_port")"
		return 0
	fi
	port_open "$local_port" && die "port $local_port is taken on this machine: free it or choose another (see infra/README.md)"
	logfile="$(mktemp "${TMPDIR:-/tmp}/port-forward-$local_port.XXXXXX")"
	# The supervisor: runs kubectl, and when it exits, runs it again. On TERM it stops its kubectl first.
	(
		child=""
		trap '[[ -n "$child" ]] && kill "$child" 2>/dev/null; exit 0' TERM INT
		while :; do
			"$KUBECTL" --context "$KUBE_CONTEXT" -n "$namespace" port-forward "$target" "$local_port:$remote_port" >>"$logfile" 2>&1 &
			child=$!
			wait "$child" || true
			child=""
			printf 'port-forward to %s/%s exited: re-opening\n' "$namespace" "$target" >>"$logfile"
			printf 'warning: port-forward to %s/%s exited (pod restarted?): re-opening\n' "$namespace" "$target" >&2
			sleep "$PORT_FORWARD_RETRY_S"
		done
	) &
	PORT_FORWARD_PIDS+=("$!")
	PORT_FORWARD_LOGS+=("$logfile")
	local _
	for _ in $(seq 1 60); do
		port_open "$local_port" && {
			log "port-forward: localhost:$local_port -> $namespace/$target:$remote_port (re-opened if it drops)"
			return 0
		}
		sleep 0.5
	done
	die "port-forward to $namespace/$target did not come up: $(cat "$logfile")"
}

# One key of the chart's generated secret (control-plane-token, labels-token).
secret_value() {
	local key="$1"
	if dry_run; then
		printf '+ %s\n' "$(render_command "$KUBECTL" --context "$KUBE_CONTEXT" -n "$PLATFORM_NAMESPACE" get secret "$SECRET_NAME" -o "jsonpath={.data.${key}}")" >&2
		echo "<${key} from secret $SECRET_NAME>"
		return 0
	fi
	"$KUBECTL" --context "$KUBE_CONTEXT" -n "$PLATFORM_NAMESPACE" get secret "$SECRET_NAME" \
		-o "jsonpath={.data.${key}}" | base64 --decode ||
		die "cannot read ${key} from secret $PLATFORM_NAMESPACE/$SECRET_NAME"
}

# The control-plane token from the chart's generated secret.
control_plane_token() {
	secret_value control-plane-token
}

# The environment the host-side CLI uses against the kind platform.
export_cluster_env() {
	export MLOPS_TARGET=kind
	export MLOPS_KFP_HOST="http://localhost:${KFP_API_PORT}"
	export MLOPS_MLFLOW_TRACKING_URI="$MLFLOW_URL"
	export MLOPS_GATEWAY_PORT=8710
	export MLOPS_GATEWAY_URL="$GATEWAY_URL"
	export MLOPS_CONTROL_PLANE_URL="http://localhost:${CONTROL_PLANE_PORT}"
	export MLOPS_CONTROLLER_URL="http://localhost:${CONTROLLER_PORT}"
	export MLOPS_IMAGE="$IMAGE"
	export MLOPS_KUBE_CONTEXT="$KUBE_CONTEXT"
	export MLOPS_NAMESPACE="$PLATFORM_NAMESPACE"
}
