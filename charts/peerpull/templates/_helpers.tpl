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

{{/* The token Secret's data, base64: peer.token if given, else what an earlier release stored,
else a new random one. */}}
{{- define "peerpull.tokenData" -}}
{{- if .Values.peer.token -}}
{{ .Values.peer.token | b64enc }}
{{- else -}}
{{ lookup "v1" "Secret" .Release.Namespace (printf "%s-token" (include "peerpull.fullname" .)) | dig "data" "token" "" | default (randAlphaNum 40 | b64enc) }}
{{- end -}}
{{- end }}

{{/* PEERPULL_PEER_TOKEN from the Secret (the chart's own, or peer.existingTokenSecret). */}}
{{- define "peerpull.tokenEnv" -}}
- name: PEERPULL_PEER_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "peerpull.tokenSecretName" . }}
      key: {{ include "peerpull.tokenSecretKey" . }}
{{- end }}
