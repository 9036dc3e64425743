{{/* The name of the release's objects: the release name, unless it already contains the chart's. */}}
{{- define "saleslayer-operator.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "saleslayer-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "saleslayer-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Labels that select the operator's pods. */}}
{{- define "saleslayer-operator.selectorLabels" -}}
app.kubernetes.io/name: saleslayer-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "saleslayer-operator.serviceAccountName" -}}
{{- default (include "saleslayer-operator.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "saleslayer-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
The Services' names are fixed: the operator's own serving certificate covers
saleslayer-operator-webhook and saleslayer-operator-quota in its namespace.
*/}}
{{- define "saleslayer-operator.webhookService" -}}saleslayer-operator-webhook{{- end -}}
{{- define "saleslayer-operator.quotaService" -}}saleslayer-operator-quota{{- end -}}
{{- define "saleslayer-operator.metricsService" -}}saleslayer-operator-metrics{{- end -}}

{{/* The cert-manager Certificate of the serving certificate (and its Secret). */}}
{{- define "saleslayer-operator.servingCertificate" -}}
{{- printf "%s-serving" (include "saleslayer-operator.fullname" .) -}}
{{- end -}}
