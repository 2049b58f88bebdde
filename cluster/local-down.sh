#!/usr/bin/env bash
# Stop the cluster cluster/local-up.sh started, and only it: every process whose command line names a node's temp
# dir under ours (raylets, GCS, dashboard, workers all carry their session folder under it). Not `ray stop`: that would also stop
# every other Ray on this machine.
set -uo pipefail

TEMP="${STEWARD_CLUSTER_TEMP:-/tmp/stw-cluster}"
pids() { pgrep -f -- "$TEMP/[A-Za-z0-9_-]+/session_" || true; }

mine="$(pids)"
[ -z "$mine" ] && { echo "no cluster running under $TEMP"; exit 0; }
kill -TERM $mine 2>/dev/null || true
# Up to 2 s for a clean exit, then force: the workers (which write the jobs' files) exit on SIGTERM within it;
# the GCS, the raylets and the autoscaler's monitor do not exit on SIGTERM at all.
for _ in $(seq 1 10); do
  [ -z "$(pids)" ] && break
  sleep 0.2
done
left="$(pids)"
[ -n "$left" ] && kill -KILL $left 2>/dev/null || true
rm -f "$TEMP/address"
echo "Ray cluster under $TEMP stopped"
