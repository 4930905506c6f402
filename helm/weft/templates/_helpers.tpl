{{/*
Names and labels shared by every template.
*/}}

{{- define "weft.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: release name, plus the chart name unless the release name already contains it.
Truncated to 52 characters so that the "-collector" / "-stitcher" suffixes stay within 63.
*/}}
{{- define "weft.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "weft.collector.fullname" -}}
{{- printf "%s-collector" (include "weft.fullname" .) }}
{{- end }}

{{- define "weft.stitcher.fullname" -}}
{{- printf "%s-stitcher" (include "weft.fullname" .) }}
{{- end }}

{{- define "weft.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "weft.labels" -}}
helm.sh/chart: {{ include "weft.chart" . }}
app.kubernetes.io/name: {{ include "weft.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: call with (dict "ctx" $ "component" "collector"). */}}
{{- define "weft.selectorLabels" -}}
app.kubernetes.io/name: {{ include "weft.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Image reference: call with (dict "ctx" $ "image" .Values.collector.image). */}}
{{- define "weft.image" -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) }}
{{- end }}

{{- define "weft.stitcher.serviceAccountName" -}}
{{- if .Values.stitcher.serviceAccount.create }}
{{- default (include "weft.stitcher.fullname" .) .Values.stitcher.serviceAccount.name }}
{{- else }}
{{- required "stitcher.serviceAccount.name is required when stitcher.serviceAccount.create is false" .Values.stitcher.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The URL the collectors stream to: collector.stitcher, or this chart's stitcher Service.
*/}}
{{- define "weft.collector.stitcherUrl" -}}
{{- if .Values.collector.stitcher }}
{{- .Values.collector.stitcher }}
{{- else }}
{{- printf "http://%s.%s.svc:%d" (include "weft.stitcher.fullname" .) .Release.Namespace (int .Values.stitcher.grpcPort) }}
{{- end }}
{{- end }}

{{/*
The ClusterRole rules of the stitcher's resolver: the ONE place that lists what it reads.
They must match the kinds stitcher/src/resolve/kube.rs watches (helm/tests/chart.rs derives
its expectation from that file); read-only, nothing else.
  core               pods (IP -> pod and its owner), services (ClusterIP -> service),
                     nodes (node IP -> node, host-network pods)
  discovery.k8s.io   endpointslices (service -> backing pod IPs)
  apps               replicasets (their owner reference names the Deployment)
  batch              jobs (their owner reference names the CronJob)
Deployments, StatefulSets, DaemonSets and CronJobs are not read: owner references name them.
*/}}
{{- define "weft.resolverRules" -}}
- apiGroups: [""]
  resources: ["pods", "services", "nodes"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["apps"]
  resources: ["replicasets"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch"]
{{- end }}
