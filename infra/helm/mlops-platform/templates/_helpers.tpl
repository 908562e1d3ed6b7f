{{/*
Shared pieces of the platform chart. Resource names are fixed (mlflow, control-plane, gateway, ...):
the services find each other by those names (MLOPS_*_URL below), so install one release per namespace.
*/}}

{{- define "mlops.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end }}

{{/* Labels. Call with (dict "root" $ "component" "gateway" ["name" "slot-a"]). */}}
{{- define "mlops.labels" -}}
helm.sh/chart: {{ include "mlops.chart" .root }}
app.kubernetes.io/name: {{ .name | default .component }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/part-of: mlops-platform
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end }}

{{- define "mlops.selectorLabels" -}}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- with .name }}
app.kubernetes.io/name: {{ . }}
{{- end }}
{{- end }}

{{/* "repository:tag" of an image block; refuses a missing or `latest` tag. */}}
{{- define "mlops.image" -}}
{{- $tag := toString .tag -}}
{{- if or (eq $tag "") (eq $tag "latest") -}}
{{- fail (printf "image %s: pin a version tag (got %q; `latest` and no tag are refused)" .repository $tag) -}}
{{- end -}}
{{- printf "%s:%s" .repository $tag -}}
{{- end }}

{{- define "mlops.projectImage" -}}
{{- include "mlops.image" .Values.image -}}
{{- end }}

{{- define "mlops.secretName" -}}
{{- .Values.secrets.existingSecret | default "mlops-platform-secrets" -}}
{{- end }}

{{/* Pod-level security context. Call with (dict "uid" 10001 "gid" 10001 "fsGroup" 10001). */}}
{{- define "mlops.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
runAsGroup: {{ .gid }}
fsGroup: {{ .fsGroup }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container-level security context. Call with (dict "uid" 10001 "gid" 10001 "readOnly" true). */}}
{{- define "mlops.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
runAsGroup: {{ .gid }}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: {{ .readOnly }}
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "mlops.appPodSecurityContext" -}}
{{- include "mlops.podSecurityContext" (dict "uid" .Values.podSecurity.runAsUser "gid" .Values.podSecurity.runAsGroup "fsGroup" .Values.podSecurity.fsGroup) }}
{{- end }}

{{- define "mlops.appContainerSecurityContext" -}}
{{- include "mlops.containerSecurityContext" (dict "uid" .Values.podSecurity.runAsUser "gid" .Values.podSecurity.runAsGroup "readOnly" true) }}
{{- end }}

{{- define "mlops.secretEnv" -}}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ include "mlops.secretName" .root }}
      key: {{ .key }}
{{- end }}

{{/* The in-cluster KFP API (the drift monitor submits retraining runs there). */}}
{{- define "mlops.kfpHost" -}}
{{- printf "http://ml-pipeline.%s.svc.cluster.local:8888" .Values.kfp.namespace -}}
{{- end }}

{{/* Environment every platform service gets (the project image's MLOPS_* settings). */}}
{{- define "mlops.commonEnv" -}}
- name: MLOPS_HOME
  value: /data
- name: MLOPS_TARGET
  value: kind
- name: HOME
  value: /tmp
- name: MLOPS_MODEL_NAME
  value: {{ .Values.platform.modelName | quote }}
- name: MLOPS_ROLLOUT_SPEC
  value: {{ .Values.platform.rolloutSpec | quote }}
- name: MLOPS_MLFLOW_TRACKING_URI
  value: http://mlflow:5000
- name: MLOPS_CONTROL_PLANE_URL
  value: http://control-plane:8700
- name: MLOPS_CONTROLLER_URL
  value: http://controller:8730
- name: MLOPS_SLOT_A_URL
  value: http://slot-a:8721
- name: MLOPS_SLOT_B_URL
  value: http://slot-b:8722
- name: MLOPS_KFP_HOST
  value: {{ include "mlops.kfpHost" . | quote }}
{{- if .Values.prometheus.enabled }}
# The chart's Prometheus: what the rollout spec's `kind: prometheus` guardrails read.
- name: MLOPS_PROMETHEUS_URL
  value: http://prometheus:9090
{{- end }}
- name: MLOPS_IMAGE
  value: {{ include "mlops.projectImage" . | quote }}
- name: MLOPS_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{ include "mlops.secretEnv" (dict "root" . "env" "MLOPS_CONTROL_PLANE_TOKEN" "key" "control-plane-token") }}
{{ include "mlops.secretEnv" (dict "root" . "env" "MLOPS_LABELS_TOKEN" "key" "labels-token") }}
- name: MLFLOW_S3_ENDPOINT_URL
  value: http://minio:9000
{{ include "mlops.secretEnv" (dict "root" . "env" "AWS_ACCESS_KEY_ID" "key" "minio-root-user") }}
{{ include "mlops.secretEnv" (dict "root" . "env" "AWS_SECRET_ACCESS_KEY" "key" "minio-root-password") }}
- name: AWS_DEFAULT_REGION
  value: us-east-1
- name: BENTOML_DO_NOT_TRACK
  value: "true"
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
{{- with .Values.platform.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Postgres credentials and the control plane's database URL (control plane and controller). */}}
{{- define "mlops.controlPlaneDbEnv" -}}
{{ include "mlops.secretEnv" (dict "root" . "env" "POSTGRES_PASSWORD" "key" "postgres-password") }}
- name: MLOPS_CONTROL_PLANE_DB_URL
  value: {{ printf "postgresql+psycopg://%s:$(POSTGRES_PASSWORD)@postgres:5432/%s" .Values.postgres.user .Values.postgres.databases.controlPlane | quote }}
{{- end }}

{{/*
The wait-for-Postgres loop. `-U` (and PGUSER, PGDATABASE) name the role: without them libpq asks the
passwd database for the current uid's name, and the postgres image has no entry for uid 10001, so every
pg_isready would fail before connecting ("local user with ID 10001 does not exist", exit 3), forever.
tests/test_pod_snippets.py runs this line under a uid with no passwd entry against a real PostgreSQL.
*/}}
{{- define "mlops.waitForPostgresScript" -}}
{{- printf "export PGUSER=%s PGDATABASE=%s; until pg_isready -h \"${PGHOST:-postgres}\" -p \"${PGPORT:-5432}\" -U %s -d %s -q; do echo \"waiting for postgres\"; sleep 2; done" .Values.postgres.user .Values.postgres.databases.controlPlane .Values.postgres.user .Values.postgres.databases.controlPlane -}}
{{- end }}

{{/*
SeaweedFS's S3 identity file, written by the object store's init container from the platform Secret
(one admin identity: the platform's S3 user). Run as the pod runs it by tests/test_pod_snippets.py.
*/}}
{{- define "mlops.s3ConfigScript" -}}
umask 077
: "${S3_ACCESS_KEY:?S3_ACCESS_KEY is not set}" "${S3_SECRET_KEY:?S3_SECRET_KEY is not set}"
case "$S3_ACCESS_KEY$S3_SECRET_KEY" in *[!A-Za-z0-9._~-]*) echo "the S3 credentials must be URL-safe characters" >&2; exit 1 ;; esac
printf '{"identities": [{"name": "platform", "credentials": [{"accessKey": "%s", "secretKey": "%s"}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}\n' "$S3_ACCESS_KEY" "$S3_SECRET_KEY" > "${S3_CONFIG_DIR:-/config}/s3.json"
echo "wrote ${S3_CONFIG_DIR:-/config}/s3.json"
{{- end }}

{{/*
The bucket Job's script (python -c SCRIPT BUCKET...): waits for the S3 API (5 minutes at most), then creates
each missing bucket. Path-style addressing, as SeaweedFS (and MinIO) answer at one host name.
*/}}
{{- define "mlops.createBucketsScript" -}}
import os, sys, time
import boto3
from botocore.config import Config
s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"], config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}, connect_timeout=5, read_timeout=10))
deadline = time.monotonic() + float(os.environ.get("S3_WAIT_SECONDS", "300"))
while True:
    try:
        existing = {bucket["Name"] for bucket in s3.list_buckets().get("Buckets", [])}
        break
    except Exception as error:
        if time.monotonic() > deadline:
            sys.exit(f"the S3 API at {os.environ['S3_ENDPOINT_URL']} did not answer in time: {error}")
        print(f"waiting for the S3 API ({type(error).__name__})", flush=True)
        time.sleep(2)
for name in sys.argv[1:]:
    if name not in existing:
        s3.create_bucket(Bucket=name)
        print(f"created bucket {name}", flush=True)
names = sorted(bucket["Name"] for bucket in s3.list_buckets().get("Buckets", []))
missing = sorted(set(sys.argv[1:]) - set(names))
if missing:
    sys.exit(f"buckets missing after creation: {missing}")
print(f"buckets: {names}", flush=True)
{{- end }}

{{/* An init container that waits until Postgres accepts connections. */}}
{{- define "mlops.waitForPostgres" -}}
- name: wait-for-postgres
  image: {{ include "mlops.image" .Values.postgres.image }}
  imagePullPolicy: IfNotPresent
  command:
    - sh
    - -c
    - {{ include "mlops.waitForPostgresScript" . | quote }}
  resources:
    {{- toYaml .Values.waitForPostgres.resources | nindent 4 }}
  securityContext:
    {{- include "mlops.appContainerSecurityContext" . | nindent 4 }}
{{- end }}

{{/* Pod annotations of the project-image workloads. */}}
{{- define "mlops.podAnnotations" -}}
{{- if .Values.image.buildId }}
mlops.io/image-id: {{ .Values.image.buildId | quote }}
{{- end }}
{{- end }}

{{/*
One platform service running the project image: Deployment + Service.
Call with (dict "root" $ "component" "gateway" "name" "gateway" "port" 8710 "args" (list ...)
  "readiness" "/healthz" "liveness" "/livez" "replicas" 1 "resources" (...)
  ["predictionLog" true] ["postgres" true] ["recreate" true] ["affinity" (...)] ["service" (...)]
  ["extraLabels" (dict ...)]).
*/}}
{{- define "mlops.appWorkload" -}}
{{- $root := .root -}}
{{- $labels := dict "root" $root "component" .component "name" .name -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .name }}
  labels:
    {{- include "mlops.labels" $labels | nindent 4 }}
spec:
  replicas: {{ .replicas }}
  revisionHistoryLimit: 3
  {{- if .recreate }}
  strategy:
    type: Recreate
  {{- end }}
  selector:
    matchLabels:
      {{- include "mlops.selectorLabels" $labels | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "mlops.labels" $labels | nindent 8 }}
        {{- with .extraLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with (include "mlops.podAnnotations" $root) }}
      annotations:
        {{- . | nindent 8 }}
      {{- end }}
    spec:
      serviceAccountName: {{ .component }}
      automountServiceAccountToken: false
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- include "mlops.appPodSecurityContext" $root | nindent 8 }}
      {{- with .affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      terminationGracePeriodSeconds: 30
      {{- if .postgres }}
      initContainers:
        {{- include "mlops.waitForPostgres" $root | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ .component }}
          image: {{ include "mlops.projectImage" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          args:
            {{- toYaml .args | nindent 12 }}
          ports:
            - name: http
              containerPort: {{ .port }}
              protocol: TCP
          env:
            {{- include "mlops.commonEnv" $root | nindent 12 }}
            {{- if .postgres }}
            {{- include "mlops.controlPlaneDbEnv" $root | nindent 12 }}
            {{- end }}
          # Python + torch/BentoML imports take a while on a busy kind node: the startup probe gives
          # them up to 5 minutes before liveness counts.
          startupProbe:
            httpGet:
              path: {{ .liveness }}
              port: http
            periodSeconds: 5
            timeoutSeconds: 3
            failureThreshold: 60
          readinessProbe:
            httpGet:
              path: {{ .readiness }}
              port: http
            periodSeconds: 5
            timeoutSeconds: 3
            failureThreshold: 3
          livenessProbe:
            httpGet:
              path: {{ .liveness }}
              port: http
            periodSeconds: 10
            timeoutSeconds: 5
            failureThreshold: 6
          resources:
            {{- toYaml .resources | nindent 12 }}
          securityContext:
            {{- include "mlops.appContainerSecurityContext" $root | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            - name: data
              mountPath: /data
            {{- if .predictionLog }}
            - name: prediction-log
              mountPath: /data/prediction-log
            {{- end }}
      volumes:
        - name: tmp
          emptyDir:
            sizeLimit: 1Gi
        # MLOPS_HOME: BentoML's home, downloaded models, reports. Scratch: durable state lives in
        # Postgres, MinIO and the prediction-log volume.
        - name: data
          emptyDir:
            sizeLimit: 4Gi
        {{- if .predictionLog }}
        - name: prediction-log
          persistentVolumeClaim:
            claimName: prediction-log
        {{- end }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ .name }}
  labels:
    {{- include "mlops.labels" $labels | nindent 4 }}
spec:
  {{- $service := .service | default dict }}
  type: {{ $service.type | default "ClusterIP" }}
  selector:
    {{- include "mlops.selectorLabels" $labels | nindent 4 }}
  ports:
    - name: http
      port: {{ .port }}
      targetPort: http
      protocol: TCP
      {{- if and (eq ($service.type | default "ClusterIP") "NodePort") $service.nodePort }}
      nodePort: {{ $service.nodePort }}
      {{- end }}
{{- end }}

{{/* Required podAffinity: on the gateway's node (see controller.yaml for why). */}}
{{- define "mlops.onGatewayNode" -}}
podAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    - labelSelector:
        matchLabels:
          app.kubernetes.io/instance: {{ .Release.Name }}
          app.kubernetes.io/component: gateway
      topologyKey: kubernetes.io/hostname
{{- end }}
