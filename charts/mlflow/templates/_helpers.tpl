{{/* vim: set filetype=mustache: */}}

{{/*
Chart name, truncated to 63 characters (a DNS label).
*/}}
{{- define "mlflow.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: <release>-<name>, or the release name when it already contains the
chart name; fullnameOverride wins. Truncated to 63 characters.
*/}}
{{- define "mlflow.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
A name derived from the full name with a suffix, kept within 63 characters.
Usage: include "mlflow.componentName" (list . "migrate")
*/}}
{{- define "mlflow.componentName" -}}
{{- $root := index . 0 }}
{{- $suffix := index . 1 }}
{{- printf "%s-%s" (include "mlflow.fullname" $root | trunc (int (sub 62 (len $suffix))) | trimSuffix "-") $suffix }}
{{- end }}

{{/*
chart label: <name>-<version>.
*/}}
{{- define "mlflow.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels that select or own objects: a user's commonLabels/podLabels may not
set them (validateValues says so), and they always win.
*/}}
{{- define "mlflow.reservedLabelKeys" -}}
{{- toJson (list "app.kubernetes.io/name" "app.kubernetes.io/instance" "app.kubernetes.io/managed-by" "app.kubernetes.io/component" "mlflow/auth") }}
{{- end }}

{{/*
One object's labels as YAML, merged - never appended, so no key appears
twice: the chart's descriptive labels (helm.sh/chart, version, part-of),
then commonLabels over them, then `extra` (e.g. podLabels) over those, then
the selector/ownership labels and `fixed` over everything.
Usage: include "mlflow.labelSet" (list . $fixed $extra), both dicts.
*/}}
{{- define "mlflow.labelSet" -}}
{{- $root := index . 0 }}
{{- $own := dict "helm.sh/chart" (include "mlflow.chart" $root) "app.kubernetes.io/version" (toString $root.Chart.AppVersion) "app.kubernetes.io/part-of" "mlflow" }}
{{- $fixed := merge (deepCopy (index . 1)) (include "mlflow.selectorLabels" $root | fromYaml) (dict "app.kubernetes.io/managed-by" $root.Release.Service) }}
{{- toYaml (merge $fixed (deepCopy (index . 2 | default dict)) (deepCopy ($root.Values.commonLabels | default dict)) $own) }}
{{- end }}

{{/*
Standard labels (app.kubernetes.io/*) for every object, commonLabels merged in.
*/}}
{{- define "mlflow.labels" -}}
{{- include "mlflow.labelSet" (list . (dict) (dict)) }}
{{- end }}

{{/*
Selector labels: name + instance only (immutable in a Deployment selector).
*/}}
{{- define "mlflow.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mlflow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The server pods' auth label, also in the Service's selector: while a
Deployment rolls from auth off (the first install's bootstrap) to auth on, the
Service - and so the Ingress/ALB behind it - reaches only pods that run with
auth; the auth-off pods are never its endpoints once auth is on.
*/}}
{{- define "mlflow.authLabel" -}}
mlflow/auth: {{ ternary "enabled" "disabled" (eq (toString .Values.auth.enabled) "true") | quote }}
{{- end }}

{{/*
Labels of a component other than the server (hook Job, test pod). The
server's selector is name + instance only, so these pods get a distinct
app.kubernetes.io/name (<name>-<component>): the Service, PDB and Deployment
must never select them.
*/}}
{{- define "mlflow.componentLabels" -}}
{{- $root := index . 0 }}
{{- $component := index . 1 }}
{{- $name := printf "%s-%s" (include "mlflow.name" $root) $component | trunc 63 | trimSuffix "-" }}
{{- include "mlflow.labelSet" (list $root (dict "app.kubernetes.io/name" $name "app.kubernetes.io/component" $component) (dict)) }}
{{- end }}

{{/*
ServiceAccount name.
*/}}
{{- define "mlflow.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mlflow.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference: repository:tag or repository@digest. The default tag is the
official -full tag of the pinned MLflow version (has psycopg2 and boto3).
*/}}
{{- define "mlflow.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default (printf "v%s-full" .Chart.AppVersion) .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
Name of the Secret the pods read.
*/}}
{{- define "mlflow.secretName" -}}
{{- default (include "mlflow.fullname" .) .Values.existingSecret }}
{{- end }}

{{/*
"true" when the chart makes the Secret itself.
*/}}
{{- define "mlflow.createSecret" -}}
{{- if and (not .Values.existingSecret) .Values.secret.create }}true{{ end }}
{{- end }}

{{/*
Path of the auth ini inside the container.
*/}}
{{- define "mlflow.authConfigPath" -}}
{{- printf "%s/basic_auth.ini" (.Values.auth.configMountPath | trimSuffix "/") }}
{{- end }}

{{/*
The basic-auth ini for the chart-made Secret. Argument: (list $root $databaseUri).
configparser interpolates `%`, so a `%` in the URI is written `%%`.
*/}}
{{- define "mlflow.authIni" -}}
{{- $root := index . 0 }}
{{- $dbUri := index . 1 -}}
[mlflow]
default_permission = {{ $root.Values.auth.defaultPermission }}
database_uri = {{ $dbUri | replace "%" "%%" }}
admin_username = {{ $root.Values.auth.adminUsername }}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = {{ int $root.Values.auth.cacheTtlSeconds }}
{{ end }}

{{/*
Data of the Secret (existing or chart-made) as found in the cluster by lookup;
an empty dict under `helm template`, a client-side dry run, or when missing.
*/}}
{{- define "mlflow.liveSecretData" -}}
{{- $secret := lookup "v1" "Secret" .Release.Namespace (include "mlflow.secretName" .) | default dict }}
{{- toJson (get $secret "data" | default dict) }}
{{- end }}

{{/*
Smallest and largest number of server pods that can run.
*/}}
{{- define "mlflow.minReplicas" -}}
{{- if .Values.autoscaling.enabled }}{{ int .Values.autoscaling.minReplicas }}{{ else }}{{ int .Values.replicaCount }}{{ end }}
{{- end }}
{{- define "mlflow.maxReplicas" -}}
{{- if .Values.autoscaling.enabled }}{{ int .Values.autoscaling.maxReplicas }}{{ else }}{{ int .Values.replicaCount }}{{ end }}
{{- end }}

{{/*
Ingress hostnames as a JSON list; `ingress.hosts` entries are strings or maps
with a `host` key.
*/}}
{{- define "mlflow.ingressHostnames" -}}
{{- $hosts := list }}
{{- range .Values.ingress.hosts }}
{{- if kindIs "string" . }}
{{- $hosts = append $hosts . }}
{{- else if and (kindIs "map" .) .host }}
{{- $hosts = append $hosts .host }}
{{- end }}
{{- end }}
{{- toJson $hosts }}
{{- end }}

{{/*
`--allowed-hosts`: the ingress hosts, the service's DNS names (with and
without the port), localhost (kubectl port-forward / exec), private IPs when
metrics are on or asked for, and mlflow.allowedHosts.
*/}}
{{- define "mlflow.allowedHosts" -}}
{{- $hosts := include "mlflow.ingressHostnames" . | fromJsonArray }}
{{- $svc := include "mlflow.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- $port := toString .Values.service.port }}
{{- range (list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.clusterDomain)) }}
{{- $hosts = append $hosts . }}
{{- $hosts = append $hosts (printf "%s:%s" . $port) }}
{{- end }}
{{- $hosts = concat $hosts (list "localhost" "localhost:*" "127.0.0.1" "127.0.0.1:*") }}
{{- if or .Values.mlflow.allowPrivateNetworkHosts .Values.metrics.enabled }}
{{- $hosts = append $hosts "10.*" }}
{{- $hosts = append $hosts "192.168.*" }}
{{- range $i := untilStep 16 32 1 }}
{{- $hosts = append $hosts (printf "172.%d.*" $i) }}
{{- end }}
{{- end }}
{{- $hosts = concat $hosts .Values.mlflow.allowedHosts }}
{{- $hosts | uniq | join "," }}
{{- end }}

{{/*
`--cors-allowed-origins`: https://<host> for each ingress host plus
mlflow.corsAllowedOrigins; when that is empty, the localhost origins MLflow
allows anyway (so the flag always has a value).
*/}}
{{- define "mlflow.corsOrigins" -}}
{{- $origins := list }}
{{- range (include "mlflow.ingressHostnames" . | fromJsonArray) }}
{{- $origins = append $origins (printf "https://%s" .) }}
{{- end }}
{{- $origins = concat $origins .Values.mlflow.corsAllowedOrigins }}
{{- if not $origins }}
{{- $origins = list "http://localhost:*" "http://127.0.0.1:*" }}
{{- end }}
{{- $origins | uniq | join "," }}
{{- end }}

{{/*
"true" when a URI is a SQLite one.
*/}}
{{- define "mlflow.isSqlite" -}}
{{- if hasPrefix "sqlite:" (lower (trim (toString .))) }}true{{ end }}
{{- end }}

{{/*
The database URIs the chart can know: from values (chart-made Secret) or from
the live existing Secret (lookup; empty under `helm template`). JSON map with
keys backend, auth (missing when unknown).
*/}}
{{- define "mlflow.knownDatabaseUris" -}}
{{- $uris := dict }}
{{- if include "mlflow.createSecret" . }}
{{- $_ := set $uris "backend" .Values.secret.backendStoreUri }}
{{- $_ := set $uris "auth" .Values.secret.authDatabaseUri }}
{{- else if .Values.existingSecret }}
{{- $data := include "mlflow.liveSecretData" . | fromJson }}
{{- with get $data .Values.secretKeys.backendStoreUri }}
{{- $_ := set $uris "backend" (b64dec .) }}
{{- end }}
{{- with get $data .Values.secretKeys.authDatabaseUri }}
{{- $_ := set $uris "auth" (b64dec .) }}
{{- end }}
{{- end }}
{{- toJson $uris }}
{{- end }}

{{/*
Fail on impossible combinations of values, with a message that says what to
change. Called from the Deployment (so `helm template`, lint and install all
see it).
*/}}
{{- define "mlflow.validateValues" -}}
{{- $messages := list }}
{{- $max := int (include "mlflow.maxReplicas" .) }}
{{- $multi := gt $max 1 }}
{{- $replicasText := ternary (printf "autoscaling up to %d replicas" $max) (printf "replicaCount=%d" $max) (eq (toString .Values.autoscaling.enabled) "true") }}
{{- $uris := include "mlflow.knownDatabaseUris" . | fromJson }}
{{- if and (not .Values.existingSecret) (not .Values.secret.create) }}
{{- $messages = append $messages "no credentials: set existingSecret to the name of a Secret with the keys in secretKeys, or secret.create=true" }}
{{- end }}
{{- if and .Values.auth.enabled $multi (hasKey $uris "auth") (include "mlflow.isSqlite" (get $uris "auth")) }}
{{- $messages = append $messages (printf "auth.enabled with more than one replica (%s) needs a shared auth database, but the auth database is SQLite (one file per pod: a user created on one pod would not exist on the others). Put the auth database on PostgreSQL (secret.authDatabaseUri, or auth-database-uri and database_uri in basic_auth.ini of existingSecret), or run one replica without autoscaling" $replicasText) }}
{{- end }}
{{- if and $multi (hasKey $uris "backend") (include "mlflow.isSqlite" (get $uris "backend")) }}
{{- $messages = append $messages (printf "a SQLite backend store cannot serve more than one replica (%s): every pod would have its own database. Use PostgreSQL (secret.backendStoreUri or backend-store-uri of existingSecret), or run one replica without autoscaling" $replicasText) }}
{{- end }}
{{- if and $multi (not (regexMatch "^[a-zA-Z][a-zA-Z0-9+.-]*://" .Values.artifacts.destination)) }}
{{- $messages = append $messages (printf "artifacts.destination %q is a path on the pod's own disk, which cannot serve more than one replica (%s). Use a shared store such as s3://BUCKET/PREFIX" .Values.artifacts.destination $replicasText) }}
{{- end }}
{{- if and .Values.ingress.enabled (not (include "mlflow.ingressHostnames" . | fromJsonArray)) }}
{{- $messages = append $messages "ingress.enabled=true needs at least one host in ingress.hosts (e.g. --set ingress.hosts[0]=mlflow.example.com); the host is also what --allowed-hosts accepts" }}
{{- end }}
{{- if and .Values.ingress.enabled (not .Values.auth.enabled) (not .Values.ingress.allowWithoutAuth) }}
{{- $messages = append $messages "ingress.enabled with auth.enabled=false would let anyone who reaches the Ingress (an internet-facing ALB by default) read and write MLflow without logging in. Keep an auth-off install inside the cluster (ingress.enabled=false; kubectl port-forward), turn auth on, or - only when something in front of the Ingress authenticates every request - set ingress.allowWithoutAuth=true" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- $messages = append $messages (printf "autoscaling.minReplicas (%d) is greater than autoscaling.maxReplicas (%d)" (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- end }}
{{- if and .Values.autoscaling.enabled (not .Values.autoscaling.targetCPUUtilizationPercentage) (not .Values.autoscaling.targetMemoryUtilizationPercentage) }}
{{- $messages = append $messages "autoscaling.enabled needs targetCPUUtilizationPercentage or targetMemoryUtilizationPercentage" }}
{{- end }}
{{- if and (include "mlflow.createSecret" .) .Values.secret.adminPassword (or (lt (len .Values.secret.adminPassword) 12) (eq .Values.secret.adminPassword "password1234")) }}
{{- $messages = append $messages "secret.adminPassword must have at least 12 characters and not be password1234 (MLflow refuses to start otherwise); leave it empty to generate one" }}
{{- end }}
{{- $reserved := include "mlflow.reservedLabelKeys" . | fromJsonArray }}
{{- range $value, $labels := dict "commonLabels" .Values.commonLabels "podLabels" .Values.podLabels }}
{{- $taken := list }}
{{- range $key := keys ($labels | default dict) | sortAlpha }}
{{- if has $key $reserved }}
{{- $taken = append $taken $key }}
{{- end }}
{{- end }}
{{- if $taken }}
{{- $messages = append $messages (printf "%s cannot set %s: the chart sets these labels itself (selectors of the Deployment, Service and PDB, helm's ownership, the auth label). Use nameOverride to change app.kubernetes.io/name" $value (join ", " $taken)) }}
{{- end }}
{{- end }}
{{- if and .Values.serviceAccount.irsaRoleArn (not .Values.serviceAccount.create) }}
{{- $messages = append $messages "serviceAccount.irsaRoleArn needs serviceAccount.create=true (or annotate your own ServiceAccount with eks.amazonaws.com/role-arn)" }}
{{- end }}
{{- if $messages }}
{{- fail (printf "\n\nVALUES VALIDATION (charts/mlflow):\n - %s\n" (join "\n - " $messages)) }}
{{- end }}
{{- end }}
