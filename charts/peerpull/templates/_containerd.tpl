{{/*
containerd's configuration for peerpull, per containerd.version (1.6 | 1.7 | 2) and
containerd.flavor (containerd | k3s): the same text as `peerpull containerd-config` prints
(peerpull/containerd_snippets.py); tests/test_chart.py renders every combination and compares.
k3s's own template fields are written with an escaped opening delimiter, so that helm leaves
them to k3s.
*/}}

{{- define "peerpull.containerdV3" -}}
{{- if eq (toString .Values.containerd.version) "2" }}yes{{ end }}
{{- end }}

{{- define "peerpull.containerdProxy" -}}
[proxy_plugins.peerpull]
  type = "snapshot"
  address = "{{ .Values.snapshotter.socket }}"
{{- if include "peerpull.containerdV3" . }}
  exports = { enable_remote_snapshot_annotations = "true" }
{{- end }}
{{- end }}

{{- define "peerpull.containerdRuntimeTable" -}}
{{- if include "peerpull.containerdV3" . -}}
plugins."io.containerd.cri.v1.runtime"
{{- else -}}
plugins."io.containerd.grpc.v1.cri"
{{- end }}
{{- end }}

{{- define "peerpull.containerdCri" -}}
{{- if include "peerpull.containerdV3" . }}
[plugins."io.containerd.cri.v1.images"]
{{- else }}
[plugins."io.containerd.grpc.v1.cri".containerd]
{{- end }}
{{- if not .Values.runtimeClass.enabled }}
  snapshotter = "peerpull"
{{- end }}
  # pass layer digests and image references to the snapshotter (lazy pulls need them)
  disable_snapshot_annotations = false
{{- if .Values.runtimeClass.enabled }}

# a runtime handler for the RuntimeClass: only its pods use the snapshotter
[{{ include "peerpull.containerdRuntimeTable" . }}.containerd.runtimes.{{ .Values.runtimeClass.name }}]
  runtime_type = "io.containerd.runc.v2"
  snapshotter = "peerpull"
[{{ include "peerpull.containerdRuntimeTable" . }}.containerd.runtimes.{{ .Values.runtimeClass.name }}.options]
  SystemdCgroup = {{ if .Values.containerd.systemdCgroup }}true{{ else }}false{{ end }}
{{- if include "peerpull.containerdV3" . }}

# containerd 2.x unpacks a pull for this handler with the snapshotter named here
[plugins."io.containerd.cri.v1.images".runtime_platforms.{{ .Values.runtimeClass.name }}]
  platform = "{{ .Values.registry.platform | default "linux/amd64" }}"
  snapshotter = "peerpull"
{{- end }}
{{- else }}
{{- if include "peerpull.containerdV3" . }}

# pulls through the transfer service unpack into the snapshotter as well
[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "{{ .Values.registry.platform | default "linux/amd64" }}"
  snapshotter = "peerpull"
{{- end }}
{{- end }}
{{- end }}

{{/* What to add to containerd's config.toml. */}}
{{- define "peerpull.containerdSnippet" -}}
{{ include "peerpull.containerdProxy" . }}
{{ include "peerpull.containerdCri" . }}
{{ end }}

{{- define "peerpull.k3sTemplateName" -}}
{{- if include "peerpull.containerdV3" . -}}
config-v3.toml.tmpl
{{- else -}}
config.toml.tmpl
{{- end }}
{{- end }}

{{/* A complete k3s containerd template (k3s's base template disables snapshot annotations). */}}
{{- define "peerpull.k3sTemplate" -}}
# k3s containerd template ({{ include "peerpull.k3sTemplateName" . }}), written by peerpull containerd-config --k3s
{{- if include "peerpull.containerdV3" . }}
version = 3

[plugins."io.containerd.internal.v1.opt"]
  path = "{{ "{{" }} .NodeConfig.Containerd.Opt }}"

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "10010"

[plugins."io.containerd.cri.v1.runtime"]
  enable_selinux = {{ "{{" }} .NodeConfig.SELinux }}

[plugins."io.containerd.cri.v1.images".pinned_images]
  sandbox = "{{ "{{" }} .NodeConfig.AgentConfig.PauseImage }}"

[plugins."io.containerd.cri.v1.images".registry]
  config_path = "{{ "{{" }} .NodeConfig.Containerd.Registry }}"

[plugins."io.containerd.cri.v1.runtime".cni]
  bin_dir = "{{ "{{" }} .NodeConfig.AgentConfig.CNIBinDir }}"
  conf_dir = "{{ "{{" }} .NodeConfig.AgentConfig.CNIConfDir }}"

[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
  SystemdCgroup = {{ "{{" }} .SystemdCgroup }}
{{- else }}
version = 2

[plugins."io.containerd.internal.v1.opt"]
  path = "{{ "{{" }} .NodeConfig.Containerd.Opt }}"

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "10010"
  enable_selinux = {{ "{{" }} .NodeConfig.SELinux }}
  sandbox_image = "{{ "{{" }} .NodeConfig.AgentConfig.PauseImage }}"

[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "{{ "{{" }} .NodeConfig.Containerd.Registry }}"

[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "{{ "{{" }} .NodeConfig.AgentConfig.CNIBinDir }}"
  conf_dir = "{{ "{{" }} .NodeConfig.AgentConfig.CNIConfDir }}"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
  SystemdCgroup = {{ "{{" }} .SystemdCgroup }}
{{- end }}

{{ include "peerpull.containerdProxy" . }}
{{ include "peerpull.containerdCri" . }}
{{ end }}

{{/* `peerpull containerd-config` flags for these values. */}}
{{- define "peerpull.containerdArgs" -}}
--containerd {{ toString .Values.containerd.version }}
{{- if .Values.runtimeClass.enabled }} --runtime-class {{ .Values.runtimeClass.name }}{{ end }}
{{- if not .Values.containerd.systemdCgroup }} --no-systemd-cgroup{{ end }}
{{- if eq .Values.containerd.flavor "k3s" }} --k3s{{ end }}
{{- end }}
