{{/* Labels every object carries. */}}
{{- define "microvpc.labels" -}}
app.kubernetes.io/part-of: microvpc
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "microvpc.tag" -}}
{{ default .Chart.AppVersion .Values.image.tag }}
{{- end -}}

{{/* Redis, the token and the log level: what every daemon reads. */}}
{{- define "microvpc.commonEnv" -}}
- name: MICROVPC_REDIS_URL
  value: {{ .Values.redis.url | quote }}
- name: MICROVPC_REDIS_PASSWORD_FILE
  value: /etc/microvpc/redis/password
- name: MICROVPC_REDIS_TIMEOUT_MS
  value: {{ .Values.redis.timeoutMs | quote }}
{{- if .Values.redis.tlsCaSecret }}
- name: MICROVPC_REDIS_TLS_CA
  value: /etc/microvpc/redis-ca/ca.crt
{{- end }}
- name: MICROVPC_TOKEN_FILE
  value: /etc/microvpc/token/token
- name: MICROVPC_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
{{- end -}}

{{- define "microvpc.commonMounts" -}}
- name: token
  mountPath: /etc/microvpc/token
  readOnly: true
- name: redis-password
  mountPath: /etc/microvpc/redis
  readOnly: true
{{- if .Values.redis.tlsCaSecret }}
- name: redis-ca
  mountPath: /etc/microvpc/redis-ca
  readOnly: true
{{- end }}
{{- end -}}

{{/* Probes: readiness is grpc.health.v1 on the plaintext health port (port+1000), liveness and startup /healthz on the metrics port (port+2000). */}}
{{- define "microvpc.probes" -}}
startupProbe:
  httpGet:
    path: /healthz
    port: {{ add .port 2000 }}
  periodSeconds: 2
  failureThreshold: 60
readinessProbe:
  grpc:
    port: {{ add .port 1000 }}
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 2
livenessProbe:
  httpGet:
    path: /healthz
    port: {{ add .port 2000 }}
  periodSeconds: 10
  timeoutSeconds: 3
  failureThreshold: 6
{{- end -}}

{{- define "microvpc.ports" -}}
- name: grpc-{{ .svc }}
  containerPort: {{ .port }}
  protocol: TCP
- name: mx-{{ .svc }}
  containerPort: {{ add .port 2000 }}
  protocol: TCP
- name: health-{{ .svc }}
  containerPort: {{ add .port 1000 }}
  protocol: TCP
{{- end -}}
