#!/usr/bin/env bash
# Start the MLflow tracking server for a team (see README.md in this folder).
#
# Laptop / single machine (default): sqlite store + artifacts in this folder, bound to 127.0.0.1.
#   mlflow/server.sh                      # http://127.0.0.1:5000
#   export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
#
# Cluster (head node): PostgreSQL for runs and the registry, S3 for artifacts (proxied by the server,
# so trials need no S3 credentials of their own):
#   MLFLOW_BACKEND_STORE_URI=postgresql://mlflow@db.internal:5432/mlflow   # password: PGPASSWORD or ~/.pgpass
#   MLFLOW_ARTIFACTS_DESTINATION=s3://my-bucket/mlflow                     # IAM instance profile, or AWS_* vars
#   MLFLOW_HOST=0.0.0.0 MLFLOW_AUTH=basic-auth MLFLOW_ALLOWED_HOSTS=head.internal:5000 mlflow/server.sh
#
# Environment (all optional):
#   MLFLOW_HOST                    bind address (127.0.0.1). Anything else requires MLFLOW_AUTH=basic-auth
#                                  or MLFLOW_INSECURE_EXPOSE=1 (e.g. behind an authenticating proxy).
#   MLFLOW_PORT                    port (5000)
#   MLFLOW_WORKERS                 server worker processes (1)
#   MLFLOW_BACKEND_STORE_URI       runs + registry store (sqlite:///<this folder>/mlflow.db)
#   MLFLOW_ARTIFACTS_DESTINATION   where proxied artifacts go (<this folder>/artifacts, or s3://bucket/prefix)
#   MLFLOW_S3_ENDPOINT_URL         S3-compatible endpoint (MinIO, moto) for s3:// destinations
#   MLFLOW_AUTH                    "basic-auth": MLflow's authentication app (users, permissions);
#                                  MLFLOW_AUTH_CONFIG_PATH (ini) and MLFLOW_AUTH_ADMIN_PASSWORD on first start
#   MLFLOW_ALLOWED_HOSTS           Host headers accepted when exposed (DNS-rebinding guard)
#   MLFLOW_BIN                     the mlflow executable (mlflow on PATH, else ../.venv/bin/mlflow)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
WORKERS="${MLFLOW_WORKERS:-1}"
BACKEND="${MLFLOW_BACKEND_STORE_URI:-sqlite:///${HERE}/mlflow.db}"
ARTIFACTS="${MLFLOW_ARTIFACTS_DESTINATION:-${HERE}/artifacts}"
MLFLOW_BIN="${MLFLOW_BIN:-$(command -v mlflow || echo "${HERE}/../.venv/bin/mlflow")}"

# No outside telemetry; no background job runner (its ~20 processes are not needed for tracking).
export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}"
export DO_NOT_TRACK="${DO_NOT_TRACK:-true}"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

args=(server --host "$HOST" --port "$PORT" --workers "$WORKERS"
      --backend-store-uri "$BACKEND" --artifacts-destination "$ARTIFACTS")

case "$HOST" in
  127.0.0.1|localhost|::1) ;;
  *)
    if [[ "${MLFLOW_AUTH:-}" != "basic-auth" && "${MLFLOW_INSECURE_EXPOSE:-0}" != "1" ]]; then
      echo "server.sh: refusing to bind $HOST without authentication." >&2
      echo "  Set MLFLOW_AUTH=basic-auth (see mlflow/README.md), or MLFLOW_INSECURE_EXPOSE=1 behind an" >&2
      echo "  authenticating proxy." >&2
      exit 2
    fi
    if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
      args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
    fi
    ;;
esac
if [[ "${MLFLOW_AUTH:-}" == "basic-auth" ]]; then
  args+=(--app-name basic-auth)
fi

if [[ "$BACKEND" == sqlite:///* ]]; then
  mkdir -p "$(dirname "${BACKEND#sqlite:///}")"
fi
if [[ "$ARTIFACTS" != *://* ]]; then
  mkdir -p "$ARTIFACTS"
fi

SHOWN_BACKEND="$(sed -E 's#(://[^:/@]*):[^@/]*@#\1:***@#' <<<"$BACKEND")"  # never print a password
echo "MLflow server on http://${HOST}:${PORT} (store: ${SHOWN_BACKEND}, artifacts: ${ARTIFACTS})" >&2
exec "$MLFLOW_BIN" "${args[@]}" "$@"
