#!/bin/sh
# Entry point of the CAO Gateway image.
#   api          migrate (with retries, while the database starts), then serve HTTP + WebSocket
#   <anything>   run it as given (workers, scheduler, simulator, manage.py commands)
set -eu

migrate_with_retries() {
    attempts="${MIGRATION_MAX_ATTEMPTS:-20}"
    sleep_seconds="${MIGRATION_RETRY_SLEEP_SECONDS:-2}"
    attempt=1
    while :; do
        if python manage.py migrate --noinput; then
            return 0
        fi
        if [ "$attempt" -ge "$attempts" ]; then
            echo "entrypoint: migrations failed after $attempt attempts; giving up." >&2
            return 1
        fi
        echo "entrypoint: migrations failed (attempt $attempt of $attempts); retrying in ${sleep_seconds}s." >&2
        attempt=$((attempt + 1))
        sleep "$sleep_seconds"
    done
}

if [ "${1:-api}" = "api" ]; then
    shift || true
    case "$(echo "${RUN_MIGRATIONS_ON_STARTUP:-true}" | tr '[:upper:]' '[:lower:]')" in
        1|true|yes|on) migrate_with_retries ;;
    esac
    # h11 with a limit on request heads (431 beyond CAO_MAX_HEADER_BYTES):
    # uvicorn's default parser reads a header of any size. As scripts/stack.py.
    exec uvicorn cao_project.asgi:application \
        --host "${HOST:-0.0.0.0}" --port "${PORT:-8000}" --lifespan off --proxy-headers \
        --timeout-graceful-shutdown 5 --http common.http_protocol:H11Protocol "$@"
fi

exec "$@"
