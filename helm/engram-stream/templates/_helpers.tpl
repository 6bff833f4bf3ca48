{{/* Names, labels and the pieces every workload shares. */}}

{{- define "engram.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "engram.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The name of one component's objects: (dict "ctx" $ "component" "shard"). */}}
{{- define "engram.component" -}}
{{- printf "%s-%s" (include "engram.fullname" .ctx | trunc 55 | trimSuffix "-") .component -}}
{{- end -}}

{{- define "engram.selectorLabels" -}}
app.kubernetes.io/name: {{ include "engram.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "engram.labels" -}}
{{ include "engram.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: engram-stream
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "engram.image" -}}
{{- $img := .Values.image -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository (default .Chart.AppVersion $img.tag) -}}
{{- end -}}
{{- end -}}

{{- define "engram.redisImage" -}}
{{- $img := .Values.redis.image -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository $img.tag -}}
{{- end -}}
{{- end -}}

{{/* Restricted Pod Security: the same for every pod and every container. */}}
{{- define "engram.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
runAsGroup: {{ .uid }}
fsGroup: {{ .uid }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "engram.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: {{ .uid }}
runAsGroup: {{ .uid }}
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Redis: where its password lives (Secret name and key), "" when there is none. */}}
{{- define "engram.redisSecretName" -}}
{{- if .Values.redis.enabled -}}
{{- default (include "engram.component" (dict "ctx" . "component" "redis")) .Values.redis.auth.existingSecret -}}
{{- else -}}
{{- .Values.redis.external.passwordSecret.name -}}
{{- end -}}
{{- end -}}

{{- define "engram.redisSecretKey" -}}
{{- if .Values.redis.enabled -}}
{{- .Values.redis.auth.existingSecretKey -}}
{{- else -}}
{{- .Values.redis.external.passwordSecret.key -}}
{{- end -}}
{{- end -}}

{{/* ENGRAM_REDIS_URL without credentials (the EngramCluster's spec.redis.url). */}}
{{- define "engram.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s.%s.svc.%s:6379/0" (include "engram.component" (dict "ctx" . "component" "redis")) .Release.Namespace .Values.clusterDomain -}}
{{- else -}}
{{- required "redis.external.url is required when redis.enabled is false" .Values.redis.external.url -}}
{{- end -}}
{{- end -}}

{{/*
The Redis variables of a container: REDIS_PASSWORD from its Secret (not a setting: only
expanded by the kubelet into the URL, which must come after it) and ENGRAM_REDIS_URL.
*/}}
{{- define "engram.redisEnv" -}}
{{- $secret := include "engram.redisSecretName" . -}}
{{- if $secret }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ include "engram.redisSecretKey" . }}
- name: ENGRAM_REDIS_URL
  value: {{ regexReplaceAll "^(rediss?://)" (include "engram.redisUrl" .) "${1}:$(REDIS_PASSWORD)@" | quote }}
{{- else }}
- name: ENGRAM_REDIS_URL
  value: {{ include "engram.redisUrl" . | quote }}
{{- end }}
{{- end -}}

{{/* ENGRAM_* variables from a dict {NAME: value}; null values are left unset. */}}
{{- define "engram.settingsEnv" -}}
{{- range $name, $value := . }}
{{- if not (kindIs "invalid" $value) }}
- name: {{ $name }}
  {{- /* values files give every number as a float64: 67108864 must not become 6.7108864e+07 */}}
  {{- if and (kindIs "float64" $value) (eq $value (floor $value)) }}
  value: {{ $value | int64 | toString | quote }}
  {{- else }}
  value: {{ $value | toString | quote }}
  {{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* What gateways and shards both read. */}}
{{- define "engram.commonSettings" -}}
{{- $s := .Values.settings -}}
{{- include "engram.redisEnv" . }}
{{- include "engram.settingsEnv" (dict
  "ENGRAM_SHARD_COUNT" .Values.shards.count
  "ENGRAM_KEY_PREFIX" $s.keyPrefix
  "ENGRAM_LOG_LEVEL" $s.logLevel
  "ENGRAM_MAX_BATCH_OBSERVATIONS" $s.maxBatchObservations
  "ENGRAM_MAX_BATCH_BYTES" $s.maxBatchBytes
  "ENGRAM_GRPC_MAX_MESSAGE_BYTES" $s.grpcMaxMessageBytes
  "ENGRAM_MAX_DIM" $s.maxDim
  "ENGRAM_MAX_K" $s.maxK
  "ENGRAM_MAX_IN_FLIGHT_BATCHES" $s.maxInFlightBatches) }}
{{- include "engram.tracingEnv" . }}
{{- end -}}

{{/* OpenTelemetry's standard variables, only when a collector is named. */}}
{{- define "engram.tracingEnv" -}}
{{- with .Values.tracing }}
{{- if .endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .endpoint | quote }}
- name: OTEL_TRACES_SAMPLER
  value: parentbased_traceidratio
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ .sampleRatio | toString | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Spread constraints: the values' own, or over nodes (hard) and zones (soft). */}}
{{- define "engram.spread" -}}
{{- $selector := include "engram.selectorLabels" (dict "ctx" .ctx "component" .component) | fromYaml -}}
{{- if .constraints }}
{{- range .constraints }}
- {{ toYaml (merge (dict "labelSelector" (dict "matchLabels" $selector)) .) | nindent 2 | trim }}
{{- end }}
{{- else }}
- maxSkew: 1
  topologyKey: kubernetes.io/hostname
  whenUnsatisfiable: {{ .nodes }}
  labelSelector:
    matchLabels: {{- toYaml $selector | nindent 6 }}
- maxSkew: 1
  topologyKey: topology.kubernetes.io/zone
  whenUnsatisfiable: ScheduleAnyway
  labelSelector:
    matchLabels: {{- toYaml $selector | nindent 6 }}
{{- end }}
{{- end -}}

{{/* nodeSelector, tolerations, affinity, priority class of a pod (from a values block). */}}
{{- define "engram.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end -}}

{{/*
Security: the Secrets a pod mounts and the variables naming the files in them, from one list
({name, path, secret, files: {VARIABLE: file}}) so a path is written once. Each Secret is
mounted as a directory, never through subPath: the kubelet swaps a changed Secret's files in
place, and the gateways reload keys and certificates without a restart. Call with
(dict "ctx" $ "component" "gateway"|"shard"|"operator").
*/}}
{{- define "engram.secretMounts" -}}
{{- $v := .ctx.Values -}}
{{- $gateway := eq .component "gateway" -}}
{{- $mounts := list -}}
{{- if and $gateway $v.auth.enabled -}}
{{- $mounts = append $mounts (dict "name" "api-keys" "path" "/etc/engram/api-keys" "secret" (include "engram.keysSecretName" .ctx) "files" (dict "ENGRAM_KEYS_FILE" "keys.json")) -}}
{{- end -}}
{{- if and $gateway $v.tls.enabled -}}
{{- $mounts = append $mounts (dict "name" "tls" "path" "/etc/engram/tls" "secret" $v.tls.secretName "files" (dict "ENGRAM_TLS_CERT" "tls.crt" "ENGRAM_TLS_KEY" "tls.key")) -}}
{{- end -}}
{{- if $v.internalAuth.enabled -}}
{{- $mounts = append $mounts (dict "name" "internal-token" "path" "/etc/engram/internal-token" "secret" (include "engram.internalTokenSecretName" .ctx) "files" (dict "ENGRAM_INTERNAL_TOKEN_FILE" "token")) -}}
{{- end -}}
{{- if $v.internalTls.enabled -}}
{{- $mounts = append $mounts (dict "name" "internal-tls" "path" "/etc/engram/internal-tls" "secret" $v.internalTls.secretName "files" (dict "ENGRAM_INTERNAL_TLS_CA" "ca.crt" "ENGRAM_INTERNAL_TLS_CERT" "tls.crt" "ENGRAM_INTERNAL_TLS_KEY" "tls.key")) -}}
{{- end -}}
{{- toYaml (dict "mounts" $mounts) -}}
{{- end -}}

{{/* The files' variables, and the gateways' default per-key limits (with auth only). */}}
{{- define "engram.securityEnv" -}}
{{- range (include "engram.secretMounts" . | fromYaml).mounts }}
{{- $path := .path }}
{{- range $name, $file := .files }}
- name: {{ $name }}
  value: {{ printf "%s/%s" $path $file | quote }}
{{- end }}
{{- end }}
{{- $auth := .ctx.Values.auth }}
{{- if and (eq .component "gateway") $auth.enabled }}
{{- include "engram.settingsEnv" (dict
  "ENGRAM_KEY_MAX_OBSERVATIONS_PER_S" $auth.keyMaxObservationsPerSecond
  "ENGRAM_KEY_MAX_RECALLS_PER_S" $auth.keyMaxRecallsPerSecond) }}
{{- end }}
{{- end -}}

{{- define "engram.securityVolumeMounts" -}}
{{- range (include "engram.secretMounts" . | fromYaml).mounts }}
- name: {{ .name }}
  mountPath: {{ .path }}
  readOnly: true
{{- end }}
{{- end -}}

{{- /* 288 = 0440: the files belong to the pods' fsGroup (10001), readable by it only. */ -}}
{{- define "engram.securityVolumes" -}}
{{- range (include "engram.secretMounts" . | fromYaml).mounts }}
- name: {{ .name }}
  secret:
    secretName: {{ .secret }}
    defaultMode: 288
{{- end }}
{{- end -}}

{{/* The Secret of the API keys: the user's, or the chart's (rendered from auth.keysJson). */}}
{{- define "engram.keysSecretName" -}}
{{- default (include "engram.component" (dict "ctx" . "component" "api-keys")) .Values.auth.existingSecret -}}
{{- end -}}

{{/* The Secret of the internal token: the user's, or the chart's random one. */}}
{{- define "engram.internalTokenSecretName" -}}
{{- default (include "engram.component" (dict "ctx" . "component" "internal-token")) .Values.internalAuth.existingSecret -}}
{{- end -}}

{{/*
A pod rolls when the chart's internal token changes (the services read it once, at start).
Keys and certificates are reloaded in place: no checksum for them.
*/}}
{{- define "engram.securityChecksums" -}}
{{- if and .Values.internalAuth.enabled (not .Values.internalAuth.existingSecret) }}
checksum/internal-token: {{ include (print .Template.BasePath "/internal-token-secret.yaml") . | sha256sum }}
{{- end }}
{{- end -}}
