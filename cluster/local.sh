#!/usr/bin/env bash
# Start a multi-node Ray cluster on ONE machine: a head node and K worker nodes,
# each a separate raylet with its own CPU count, ports and temp dir. It is the
# cheapest way to exercise multi-node code paths (placement groups spread over
# nodes, Ray Data shuffles between nodes, worker-group restarts) on a laptop.
#
#   cluster/local.sh [start] [--workers K] [--cpus N] [--head-cpus N]
#                            [--gpus-per-worker N] [--no-auth]
#   cluster/local.sh status
#   cluster/local.sh stop          # `ray stop --force`: stops EVERY Ray process
#                                  # of this user on this machine, not only ours
#
# Every flag has an environment variable (flags win):
#   CHATSFT_LOCAL_WORKERS          K worker nodes                    (default 2)
#   CHATSFT_LOCAL_CPUS             CPUs per worker node              (default 1)
#   CHATSFT_LOCAL_HEAD_CPUS        CPUs of the head node             (default 1)
#   CHATSFT_LOCAL_GPUS             GPUs per worker node              (default 0)
#   CHATSFT_LOCAL_NODE_IP          address printed for clients and   (default 127.0.0.1)
#                                  passed as --node-ip-address; Ray
#                                  itself maps 127.0.0.1 to the host's
#                                  primary IP as the node's identity
#   CHATSFT_LOCAL_GCS_PORT         head (GCS) port                   (default 6379)
#   CHATSFT_LOCAL_DASHBOARD_PORT   dashboard + job server port       (default 8265)
#   CHATSFT_LOCAL_CLIENT_PORT      Ray Client server port            (default 10001)
#   CHATSFT_LOCAL_PORT_BASE        first of the per-node ports       (default 20000)
#   CHATSFT_LOCAL_OBJECT_STORE_MB  object store per node, MiB        (default 512)
#   CHATSFT_LOCAL_MEMORY_MB        Ray "memory" resource per node,   (default: unset, Ray
#                                  MiB                                counts all RAM per node)
#   CHATSFT_LOCAL_TEMP_DIR         root of the per-node temp dirs    (default /tmp/chatsft-ray)
#   RAY                            the ray executable                (default: ray on PATH)
#
# Several raylets on one host: what has to differ per node
#   * --temp-dir: each node gets <root>/<node> (sockets, logs, session dir), so
#     nothing in /tmp/ray is shared with other Ray users on the machine.
#   * ports whose default is FIXED and would collide: the dashboard agent's HTTP
#     port (default 52365 on every node). We also pin node-manager, object-manager,
#     agent gRPC, runtime-env agent and metrics ports (defaults: random) to
#     PORT_BASE + 10*node + {0..5}, so the layout is predictable and outside the
#     kernel's ephemeral range, and give each node a disjoint worker-port range
#     inside Ray's default 10002-19999 (Ray's default is the same range for
#     every raylet).
#   * --object-store-memory: Ray's default is 30% of RAM *per node*; K+1 nodes
#     on one host would ask for far more /dev/shm than exists.
#
# Token authentication (Ray 2.60; verified against the installed ray package and
# docs.ray.io/en/latest/ray-security/token-auth.html):
#   * Mode comes ONLY from the environment variable RAY_AUTH_MODE (token|disabled);
#     Ray refuses it in _system_config. Every node and every client must agree.
#   * The token is looked up in this order: RAY_AUTH_TOKEN (the token itself),
#     RAY_AUTH_TOKEN_PATH (a file holding it), then ~/.ray/auth_token.
#   * `ray start --head` with RAY_AUTH_MODE unset turns token mode on by itself
#     when a token already exists (and warns "Token authentication is enabled
#     for this Ray cluster"); `ray start --address` (worker) and the job client
#     do NOT infer it, so this script exports RAY_AUTH_MODE=token for all nodes.
#   * `ray start` never creates a token (it fails with "Token authentication is
#     enabled but no authentication token was found"); `ray get-auth-token
#     --generate` writes ~/.ray/auth_token if no token exists. Only `ray.init()`
#     starting a fresh local Ray generates one on its own.
#   * The job client (`ray job submit/status/logs`, JobSubmissionClient) sends
#     "Authorization: Bearer <token>" only when RAY_AUTH_MODE=token is set in
#     ITS environment; without it the dashboard answers 401 Unauthorized.
#   So a submitter on this machine needs exactly: RAY_AUTH_MODE=token (the token
#   is read from ~/.ray/auth_token). From another machine: also RAY_AUTH_TOKEN
#   (or RAY_AUTH_TOKEN_PATH), e.g. RAY_AUTH_TOKEN=$(ray get-auth-token) there.
#   --no-auth starts everything with RAY_AUTH_MODE=disabled instead.
#
# Checked with ray 2.60.0 (`cluster/local.sh start --workers 1`, 1 CPU each):
#   RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 \
#     --working-dir . -- python -c "import ray; ray.init(); print(ray.cluster_resources())"
#   -> SUCCEEDED, CPU 2.0, tasks ran on both nodes. Without RAY_AUTH_MODE in the
#   submitter: "401 Unauthorized: Missing authentication token" (even with
#   ~/.ray/auth_token present); with a wrong RAY_AUTH_TOKEN: "403 Forbidden";
#   a worker `ray start --address` without RAY_AUTH_MODE against a token head:
#   "InvalidAuthToken". With HOME pointing elsewhere, RAY_AUTH_MODE=token plus
#   RAY_AUTH_TOKEN=<token> was enough to list jobs.
set -euo pipefail

usage() { sed -n '2,/^# Several raylets/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

cmd=start
case "${1:-}" in
  start|stop|status) cmd=$1; shift ;;
  -h|--help|help) usage; exit 0 ;;
esac

WORKERS=${CHATSFT_LOCAL_WORKERS:-2}
CPUS=${CHATSFT_LOCAL_CPUS:-1}
HEAD_CPUS=${CHATSFT_LOCAL_HEAD_CPUS:-1}
GPUS=${CHATSFT_LOCAL_GPUS:-0}
NODE_IP=${CHATSFT_LOCAL_NODE_IP:-127.0.0.1}
GCS_PORT=${CHATSFT_LOCAL_GCS_PORT:-6379}
DASHBOARD_PORT=${CHATSFT_LOCAL_DASHBOARD_PORT:-8265}
CLIENT_PORT=${CHATSFT_LOCAL_CLIENT_PORT:-10001}
PORT_BASE=${CHATSFT_LOCAL_PORT_BASE:-20000}
OBJECT_STORE_MB=${CHATSFT_LOCAL_OBJECT_STORE_MB:-512}
MEMORY_MB=${CHATSFT_LOCAL_MEMORY_MB:-}
TEMP_ROOT=${CHATSFT_LOCAL_TEMP_DIR:-/tmp/chatsft-ray}
RAY=${RAY:-ray}
AUTH=token

while [ $# -gt 0 ]; do
  case "$1" in
    --workers) WORKERS=$2; shift 2 ;;
    --cpus) CPUS=$2; shift 2 ;;
    --head-cpus) HEAD_CPUS=$2; shift 2 ;;
    --gpus-per-worker) GPUS=$2; shift 2 ;;
    --no-auth) AUTH=disabled; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "local.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

for v in WORKERS CPUS HEAD_CPUS GPUS GCS_PORT DASHBOARD_PORT CLIENT_PORT PORT_BASE OBJECT_STORE_MB ${MEMORY_MB:+MEMORY_MB}; do
  case "${!v}" in
    ''|*[!0-9]*) echo "local.sh: $v must be a non-negative integer, got '${!v}'" >&2; exit 2 ;;
  esac
done

if ! command -v "$RAY" >/dev/null 2>&1; then
  echo "local.sh: '$RAY' not found; activate the venv (source .venv/bin/activate) or set RAY=" >&2
  exit 1
fi

# The mode must be the same for every node and client: export it once here.
# Respect a mode the caller set explicitly unless --no-auth was given.
if [ "$AUTH" = disabled ]; then
  export RAY_AUTH_MODE=disabled
else
  export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
fi

GCS_ADDRESS="$NODE_IP:$GCS_PORT"
JOB_ADDRESS="http://$NODE_IP:$DASHBOARD_PORT"

ensure_token() {
  [ "$RAY_AUTH_MODE" = token ] || return 0
  if [ -n "${RAY_AUTH_TOKEN:-}" ]; then
    echo "auth: using the token in RAY_AUTH_TOKEN"
  elif [ -n "${RAY_AUTH_TOKEN_PATH:-}" ]; then
    if [ ! -s "$RAY_AUTH_TOKEN_PATH" ]; then
      echo "local.sh: RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH is missing or empty" >&2
      exit 1
    fi
    echo "auth: using the token in $RAY_AUTH_TOKEN_PATH"
  elif [ -s "$HOME/.ray/auth_token" ]; then
    echo "auth: using the token in ~/.ray/auth_token"
  else
    # Writes ~/.ray/auth_token (mode as umask allows; keep it private).
    (umask 077 && "$RAY" get-auth-token --generate >/dev/null)
    echo "auth: generated a new token in ~/.ray/auth_token"
  fi
}

# node_args INDEX: ports, worker-port range and temp dir of node INDEX (0 = head).
node_args() {
  local i=$1 base span lo hi
  base=$((PORT_BASE + 10 * i))
  span=$((9998 / (WORKERS + 1)))
  lo=$((10002 + span * i))
  hi=$((lo + span - 1))
  local name=head
  [ "$i" -gt 0 ] && name="worker$i"
  echo "--node-ip-address=$NODE_IP" \
       "--node-manager-port=$base" \
       "--object-manager-port=$((base + 1))" \
       "--dashboard-agent-listen-port=$((base + 2))" \
       "--dashboard-agent-grpc-port=$((base + 3))" \
       "--runtime-env-agent-port=$((base + 4))" \
       "--metrics-export-port=$((base + 5))" \
       "--min-worker-port=$lo" "--max-worker-port=$hi" \
       "--object-store-memory=$((OBJECT_STORE_MB * 1024 * 1024))" \
       "--temp-dir=$TEMP_ROOT/$name" \
       "--disable-usage-stats" \
       ${MEMORY_MB:+"--memory=$((MEMORY_MB * 1024 * 1024))"}
}

start() {
  if [ "$WORKERS" -gt 9 ]; then
    echo "local.sh: at most 9 worker nodes (ports are PORT_BASE + 10*node)" >&2
    exit 2
  fi
  ensure_token
  mkdir -p "$TEMP_ROOT"

  echo "== head: $HEAD_CPUS CPU, GCS $GCS_ADDRESS, dashboard $JOB_ADDRESS"
  # shellcheck disable=SC2046  # node_args is a list of words on purpose
  "$RAY" start --head \
    --port="$GCS_PORT" \
    --dashboard-host="$NODE_IP" --dashboard-port="$DASHBOARD_PORT" \
    --ray-client-server-port="$CLIENT_PORT" \
    --num-cpus="$HEAD_CPUS" --num-gpus=0 \
    $(node_args 0)

  local i
  for i in $(seq 1 "$WORKERS"); do
    echo "== worker$i: $CPUS CPU, $GPUS GPU"
    # shellcheck disable=SC2046
    "$RAY" start --address="$GCS_ADDRESS" \
      --num-cpus="$CPUS" --num-gpus="$GPUS" \
      $(node_args "$i")
  done

  # Wait until every node has registered with the GCS.
  local want=$((WORKERS + 1)) have=0 tries=0
  while [ "$tries" -lt 60 ]; do
    have=$("$RAY" list nodes --address "$GCS_ADDRESS" --filter "state=ALIVE" --format json 2>/dev/null \
      | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))' 2>/dev/null || echo 0)
    [ "$have" -ge "$want" ] && break
    tries=$((tries + 1))
    sleep 1
  done
  if [ "$have" -lt "$want" ]; then
    echo "local.sh: only $have of $want nodes came up; logs under $TEMP_ROOT/*/session_latest/logs" >&2
    exit 1
  fi

  local auth_env=""
  [ "$RAY_AUTH_MODE" = token ] && auth_env="RAY_AUTH_MODE=token "
  cat <<EOF

chatsft local cluster: 1 head + $WORKERS workers, $want nodes alive
  GCS address   : $GCS_ADDRESS        (ray.init(address="$GCS_ADDRESS"), ray status --address $GCS_ADDRESS)
  dashboard/jobs: $JOB_ADDRESS
  auth mode     : $RAY_AUTH_MODE$( [ "$RAY_AUTH_MODE" = token ] && echo " (token: RAY_AUTH_TOKEN > RAY_AUTH_TOKEN_PATH > ~/.ray/auth_token)")
  logs          : $TEMP_ROOT/<node>/session_latest/logs

Submit a job from the repo root:
  ${auth_env}ray job submit --address $JOB_ADDRESS --working-dir . -- python jobs/train.py configs/tiny.yaml

Stop it:
  cluster/local.sh stop
EOF
}

status() {
  "$RAY" status --address "$GCS_ADDRESS"
}

stop() {
  # `ray stop` has no notion of "this cluster": --force kills every Ray process
  # (gcs_server, raylet, dashboard, workers) that this user runs on the host.
  "$RAY" stop --force
}

"$cmd"
