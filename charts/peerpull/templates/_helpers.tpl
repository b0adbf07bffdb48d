{{/*
Helpers of the peerpull chart. The templates keep to a small subset of Go templates, which the
repository's tests render without helm (tests/support/helm_render.py).
*/}}

{{/* Base name of every object: the release name, or fullnameOverride (50 characters at most, so
that "<name>-warmup-<revision>" stays a valid label value). */}}
{{- define "peerpull.fullname" -}}
{{ .Values.fullnameOverride | default .Release.Name | trunc 50 | trimSuffix "-" }}
{{- end }}

{{- define "peerpull.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "peerpull.labels" -}}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{ include "peerpull.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "peerpull.image" -}}
"{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}"
{{- end }}

{{- define "peerpull.serviceAccountName" -}}
{{- if .Values.serviceAccount.name }}
{{- .Values.serviceAccount.name }}
{{- else }}
{{- include "peerpull.fullname" . }}
{{- end }}
{{- end }}

{{/* The Secret holding the cluster token, and its key. */}}
{{- define "peerpull.tokenSecretName" -}}
{{- if .Values.peer.existingTokenSecret }}
{{- .Values.peer.existingTokenSecret }}
{{- else }}
{{- include "peerpull.fullname" . }}-token
{{- end }}
{{- end }}

{{- define "peerpull.tokenSecretKey" -}}
{{- if .Values.peer.existingTokenSecret }}
{{- .Values.peer.existingTokenSecretKey | default "token" }}
{{- else -}}
token
{{- end }}
{{- end }}

{{/* PEERPULL_PEER_TOKEN from the Secret; render it only when a token is configured. */}}
{{- define "peerpull.tokenEnv" -}}
- name: PEERPULL_PEER_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "peerpull.tokenSecretName" . }}
      key: {{ include "peerpull.tokenSecretKey" . }}
{{- end }}

{{/* Path of the probes. With a cluster token the daemon answers /v1/health only to requests that
carry it (401 otherwise, which kubelet counts as a failure), and a probe cannot read a Secret: then
the probes use /metrics, the one endpoint served without the token, answered by the same server. */}}
{{- define "peerpull.probePath" -}}
{{- if or .Values.peer.token .Values.peer.existingTokenSecret -}}
/metrics
{{- else -}}
/v1/health
{{- end }}
{{- end }}
