#!/bin/sh
# Entry point of the dinocluster images: runs the command it is given (the
# image's CMD or compose's `command`, e.g. `python -m clustering_service`)
# unchanged. One case needs more: the clustering service on its embedded
# PostgreSQL (no CLUSTERING_DATABASE_URL), which runs as a separate server in
# $CLUSTERING_DATA_DIR/postgres and, by design, outlives the Python process
# (an API that crashes finds its database running). In a container it must
# live and die with the container instead:
#   - before the command: the lock files a killed container leaves behind
#     (postmaster.pid, and .s.PGSQL.5432.lock beside the socket, which lives in
#     the same directory) name pids of that container's lifetime. Nothing runs
#     that server in this fresh container, so they are stale and are removed
#     (PostgreSQL then recovers from its WAL as after any crash). Left there, a
#     pid may belong to an unrelated process here: pgserver then takes the
#     server for running, or PostgreSQL refuses to start ("lock file already
#     exists"), depending on which process got which pid this time.
#   - after the command (stopped by SIGTERM from `docker stop`, forwarded to
#     it, or exited on its own): the server is shut down cleanly
#     (`pg_ctl stop -m fast`) instead of being killed with the container.
# Everything else (the embedding service, workers and APIs on a PostgreSQL
# server) is exec'ed directly.
set -u

pgdata=""
if [ -z "${CLUSTERING_DATABASE_URL:-}" ]; then
  for arg in "$@"; do
    if [ "$arg" = clustering_service ]; then
      pgdata="${CLUSTERING_DATA_DIR:-data/clustering}/postgres"
    fi
  done
fi
[ -n "$pgdata" ] || exec "$@"

postgres_running() {
  for comm in /proc/[0-9]*/comm; do
    [ "$(cat "$comm" 2>/dev/null)" = postgres ] && return 0
  done
  return 1
}

if ! postgres_running; then
  for stale in "$pgdata/postmaster.pid" "$pgdata"/.s.PGSQL.*; do
    if [ -e "$stale" ]; then
      echo "dinocluster-entrypoint: removing $stale, left by a container that was killed" >&2
      rm -f "$stale"
    fi
  done
fi

"$@" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null' TERM INT
status=0
wait "$child" || status=$?
# a trapped signal ends `wait` early: wait again until the command has exited
while kill -0 "$child" 2>/dev/null; do
  status=0
  wait "$child" || status=$?
done

if [ -f "$pgdata/postmaster.pid" ]; then
  pg_ctl=$(python -c 'import pathlib, pgserver; print(pathlib.Path(pgserver.__file__).parent / "pginstall/bin/pg_ctl")')
  "$pg_ctl" -D "$pgdata" -m fast -w -t 30 stop >/dev/null \
    || echo "dinocluster-entrypoint: could not stop the embedded PostgreSQL in $pgdata" >&2
fi
exit "$status"
