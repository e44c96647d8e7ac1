{{/* Full name: the release name, truncated to 63 characters. */}}
{{- define "runner.fullname" -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The ServiceAccount's name. */}}
{{- define "runner.serviceAccountName" -}}
{{- default (include "runner.fullname" .) .Values.serviceAccount.name }}
{{- end }}

{{/* Standard labels. */}}
{{- define "runner.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: rollout-runner
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Impossible combinations. */}}
{{- define "runner.validateValues" -}}
{{- if and (not .Values.serviceAccount.create) (not .Values.serviceAccount.name) }}
{{- fail "serviceAccount.name is required when serviceAccount.create is false (the RoleBinding names it)" }}
{{- end }}
{{- end }}
