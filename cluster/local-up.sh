#!/usr/bin/env bash
# A real two-node Ray cluster on this machine: a head node and one worker node, each its own raylet with its own
# resources, joined over loopback. Ports are off Ray's defaults so the cluster never collides with an embedded
# `ray.init()` on the same machine, and the temp dir is our own so `ray.init()` elsewhere never joins it by accident
# (Ray looks for <temp-dir>/ray_current_cluster). Stop it with cluster/local-down.sh, never `ray stop` (that stops
# every Ray on the machine).
#
#   cluster/local-up.sh            # head 1 CPU + worker 1 CPU; Jobs API at http://127.0.0.1:8275
#   STEWARD_WORKER_CPUS=2 cluster/local-up.sh
#   cluster/local-up.sh worker worker2 12800   # add a worker node (name, first port) to the running cluster
#
# The worker node gets its own loopback address (127.0.0.2) so the nodes have distinct IPs, as on a real cluster.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RAY="${STEWARD_RAY:-$(command -v ray || echo "$HERE/../.venv/bin/ray")}"
TEMP="${STEWARD_CLUSTER_TEMP:-/tmp/stw-cluster}"   # short: Ray's unix socket paths live under it
GCS_PORT="${STEWARD_GCS_PORT:-6390}"
DASHBOARD_PORT="${STEWARD_DASHBOARD_PORT:-8275}"
CLIENT_PORT="${STEWARD_CLIENT_PORT:-10011}"
HEAD_IP="${STEWARD_HEAD_IP:-127.0.0.1}"
WORKER_IP="${STEWARD_WORKER_IP:-127.0.0.2}"
HEAD_CPUS="${STEWARD_HEAD_CPUS:-1}"
WORKER_CPUS="${STEWARD_WORKER_CPUS:-1}"
HEAD_PORTS="${STEWARD_HEAD_PORTS:-12400}"       # first of the head's node ports (+0..5, workers +100..199)
WORKER_PORTS="${STEWARD_WORKER_PORTS:-12600}"   # the same for worker1
OBJECT_STORE="${STEWARD_OBJECT_STORE_BYTES:-300000000}"   # 300 MB a node: the machine is shared

# Ray 2.60 turns on token auth when ~/.ray/auth_token exists; this loopback-only test cluster opts out, as a
# worker node started with --address would not pick the token up (README: token auth on a real cluster).
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
export RAY_USAGE_STATS_ENABLED=0 DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
# Jobs run `python -m steward` on the head: the python beside this ray is the one with steward's dependencies.
export PATH="$(dirname "$RAY"):$PATH"
# DeepSpeed JIT-builds its CPU ops into the torch extensions cache. Seen here: with the cache shared with other Ray
# instances on the machine, each side rebuilt fused_adam (minutes on 2 busy cores) whenever the other had built it.
# The cluster's own cache is built once and kept across clusters.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/steward-cluster/torch_extensions}"
mkdir -p "$TEMP"

# node <name> <ip> <first port> <cpus> <extra args...>: every port a node opens is pinned, distinct per node.
node() {
  local name="$1" ip="$2" base="$3" cpus="$4"
  shift 4
  # A temp dir per node: each node's runtime-env agent deletes unused job packages from its own folder, and a shared
  # folder let the worker node delete the working_dir a driver on the head was still running in (seen here).
  "$RAY" start --node-ip-address "$ip" --num-cpus "$cpus" --num-gpus 0 --temp-dir "$TEMP/$name" \
    --resources "{\"node:$name\": 1}" --object-store-memory "$OBJECT_STORE" \
    --node-manager-port "$base" --object-manager-port $((base + 1)) \
    --dashboard-agent-listen-port $((base + 2)) --dashboard-agent-grpc-port $((base + 3)) \
    --metrics-export-port $((base + 4)) --runtime-env-agent-port $((base + 5)) \
    --min-worker-port $((base + 100)) --max-worker-port $((base + 199)) \
    --disable-usage-stats "$@" >"$TEMP/$name.out" 2>&1 || { cat "$TEMP/$name.out"; return 1; }
}

if [ "${1:-}" = worker ]; then
  node "${2:-worker2}" "$WORKER_IP" "${3:-12800}" "$WORKER_CPUS" --address "$HEAD_IP:$GCS_PORT"
  echo "worker node ${2:-worker2} joined $HEAD_IP:$GCS_PORT"
  exit 0
fi
node head "$HEAD_IP" "$HEAD_PORTS" "$HEAD_CPUS" --head --port "$GCS_PORT" --include-dashboard true \
  --dashboard-host "$HEAD_IP" --dashboard-port "$DASHBOARD_PORT" --ray-client-server-port "$CLIENT_PORT"
node worker1 "$WORKER_IP" "$WORKER_PORTS" "$WORKER_CPUS" --address "$HEAD_IP:$GCS_PORT"

echo "$HEAD_IP:$GCS_PORT" >"$TEMP/address"
echo "Ray cluster up: 2 nodes (head $HEAD_CPUS CPU, worker1 $WORKER_CPUS CPU)"
echo "  GCS address   $HEAD_IP:$GCS_PORT   (steward train SPEC --address $HEAD_IP:$GCS_PORT)"
echo "  Jobs API      http://$HEAD_IP:$DASHBOARD_PORT   (steward submit SPEC --address http://$HEAD_IP:$DASHBOARD_PORT)"
echo "  stop with     cluster/local-down.sh"
