{{/* Names are fixed (kubepeer-*): they match `kubepeer rbac`, and one release runs per cluster. */}}

{{- define "kubepeer.modelNamespace" -}}
{{- .Values.modelNamespace | default .Release.Namespace -}}
{{- end -}}

{{- define "kubepeer.commonLabels" -}}
app.kubernetes.io/part-of: kubepeer
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kubepeer.labels" -}}
{{ include "kubepeer.commonLabels" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The selector labels of one component: (dict "root" $ "component" "proxy") */}}
{{- define "kubepeer.selector" -}}
app.kubernetes.io/name: kubepeer-{{ .component }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end -}}

{{- define "kubepeer.componentLabels" -}}
{{ include "kubepeer.commonLabels" .root }}
{{ include "kubepeer.selector" . }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "kubepeer.image" -}}
{{- $image := index .root.Values.images .name -}}
{{- printf "%s:%s" $image.repository ($image.tag | default .root.Chart.AppVersion) -}}
{{- end -}}

{{- define "kubepeer.redisUrl" -}}
{{- printf "redis://kubepeer-redis.%s.svc.cluster.local:6379/0" .Release.Namespace -}}
{{- end -}}

{{/* KUBEPEER_REDIS_URL for every component: in-chart, a value, or a Secret (a URL may
     hold a password, so never a flag). */}}
{{- define "kubepeer.redisEnv" -}}
- name: KUBEPEER_REDIS_URL
{{- if .Values.redis.enabled }}
  value: {{ include "kubepeer.redisUrl" . | quote }}
{{- else if .Values.redis.externalUrlSecret.name }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.externalUrlSecret.name }}
      key: {{ .Values.redis.externalUrlSecret.key }}
{{- else }}
  value: {{ required "redis.externalUrl (or redis.externalUrlSecret.name) is required when redis.enabled is false" .Values.redis.externalUrl | quote }}
{{- end }}
{{- end -}}

{{/* Every pod of the chart: placement, pull secrets, no privilege. */}}
{{- define "kubepeer.podCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "kubepeer.podSecurity" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  fsGroup: 10001
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{- define "kubepeer.containerSecurity" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: [ALL]
{{- end -}}

{{/* A Secret's value: kept from the live object on upgrade, else generated once.
     (dict "root" $ "name" "kubepeer-proxy-secrets" "key" "recipient-secret") */}}
{{- define "kubepeer.generated" -}}
{{- $live := lookup "v1" "Secret" .namespace .name -}}
{{- if and $live $live.data (hasKey $live.data .key) -}}
{{- index $live.data .key -}}
{{- else -}}
{{- sha256sum (randAlphaNum 64) | b64enc -}}
{{- end -}}
{{- end -}}

{{/* The secret and key a value comes from: the user's Secret or the chart's. */}}
{{- define "kubepeer.secretRef" -}}
{{- if .spec.existingSecret -}}{{ .spec.existingSecret }}{{- else -}}{{ .default }}{{- end -}}
{{- end -}}

{{/* The key a value has in that Secret: the user's key, or the chart's own name for it. */}}
{{- define "kubepeer.secretKey" -}}
{{- if .spec.existingSecret -}}{{ .spec.key }}{{- else -}}{{ .default }}{{- end -}}
{{- end -}}

{{/* The Secret holding the proxy's certificate: the user's, cert-manager's, or none
     (a self-signed certificate per pod). Empty in plaintext mode. */}}
{{- define "kubepeer.proxyTlsSecret" -}}
{{- $tls := .Values.proxy.tls -}}
{{- if not $tls.plaintext -}}
{{- if $tls.secretName -}}{{ $tls.secretName }}{{- else if $tls.certManager.enabled -}}kubepeer-proxy-tls{{- end -}}
{{- end -}}
{{- end -}}
