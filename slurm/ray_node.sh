#!/usr/bin/env bash
# One Ray node of a Slurm job, run by slurm/ray_job.sbatch under srun (one task per node):
#
#   ray_node.sh node-ip   print "IP IFACE": the address this node's Ray uses, and its interface
#   ray_node.sh head      start the Ray head, then write $RAY_LOG_DIR/head.ready ("IP:PORT")
#   ray_node.sh worker    wait for head.ready, then join the head
#   ray_node.sh keep-logs copy this node's Ray session logs of the job to $RAY_LOG_DIR/ray-logs-<rank>
#
# head/worker block until Slurm (or ray_job.sbatch) stops the step; SIGTERM stops Ray cleanly.
# Every node uses a fresh, job-private Ray temp dir, removed before start and after stop, so a
# requeued job never meets the previous attempt's session. Configuration comes from the
# environment that ray_job.sbatch exports (see the defaults below).
set -uo pipefail

: "${RAY_BIN:=ray}"
: "${RAY_IFACE:=}"           # interface whose IPv4 Ray uses (ib0, eth0, ...); empty = first global IPv4
: "${RAY_NODE_IP:=}"         # explicit address for every node; only for a single-host test (127.0.0.1)
: "${RAY_PORT:=6379}"        # GCS port of the head
: "${RAY_NODE_PORT_BASE:=20000}"  # node ports base+0..5, worker ports base+100..base+999
: "${RAY_PORT_STRIDE:=0}"    # added per node rank: >0 only when several "nodes" share one host
: "${RAY_TMP_BASE:=/tmp}"
: "${RAY_START_TIMEOUT_S:=300}"
: "${RAY_OBJECT_STORE_BYTES:=}"
: "${CPUS_PER_NODE:=${SLURM_CPUS_ON_NODE:-1}}"
: "${GPUS_PER_NODE:=0}"

NODE="${SLURMD_NODENAME:-$(hostname -s)}"
log() { echo "[ray_node $NODE $(date +%T)] $*" >&2; }
die() {
    log "FATAL: $*"
    exit 1
}

# "IP IFACE" of this node. Never loopback unless RAY_NODE_IP says so explicitly.
node_ip() {
    local line ip iface
    if [ -n "$RAY_NODE_IP" ]; then
        iface=$(ip -4 -o addr show | awk -v ip="$RAY_NODE_IP" '{split($4, a, "/"); if (a[1] == ip) {print $2; exit}}')
        [ -n "$iface" ] || die "RAY_NODE_IP=$RAY_NODE_IP is not an address of this node"
        echo "$RAY_NODE_IP $iface"
        return 0
    fi
    if [ -n "$RAY_IFACE" ]; then
        line=$(ip -4 -o addr show dev "$RAY_IFACE" 2>/dev/null | head -n 1)
        [ -n "$line" ] || die "no IPv4 address on interface RAY_IFACE=$RAY_IFACE (ip -4 -o addr show dev $RAY_IFACE)"
    else
        line=$(ip -4 -o addr show scope global | head -n 1)
        [ -n "$line" ] || die "no global IPv4 address on this node: set RAY_IFACE to the cluster interface"
    fi
    iface=$(awk '{print $2}' <<<"$line")
    ip=$(awk '{split($4, a, "/"); print a[1]}' <<<"$line")
    case "$ip" in
        127.*) die "interface $iface has the loopback address $ip, which other nodes cannot reach; set RAY_IFACE to the cluster interface (or RAY_NODE_IP=127.0.0.1 explicitly for a single-host test)" ;;
    esac
    echo "$ip $iface"
}

# Ray's per-node ports for node rank $1: fixed, below the ephemeral range (docs/slurm.md).
port_args() {
    local b=$((RAY_NODE_PORT_BASE + $1 * RAY_PORT_STRIDE))
    echo "--node-manager-port=$b --object-manager-port=$((b + 1)) --metrics-export-port=$((b + 2))" \
        "--dashboard-agent-listen-port=$((b + 3)) --dashboard-agent-grpc-port=$((b + 4))" \
        "--runtime-env-agent-port=$((b + 5)) --min-worker-port=$((b + 100)) --max-worker-port=$((b + 999))"
}

common_args() {
    echo "--num-cpus=$CPUS_PER_NODE --num-gpus=$GPUS_PER_NODE --disable-usage-stats"
    if [ -n "$RAY_OBJECT_STORE_BYTES" ]; then echo "--object-store-memory=$RAY_OBJECT_STORE_BYTES"; fi
}

# `ray`, or for an explicit loopback node address (single-host tests) Ray's CLI through
# ray_loopback.py, which keeps 127.0.0.1 where plain `ray start` would swap in the external address.
RAY_CMD=("$RAY_BIN")
case "$RAY_NODE_IP" in
    127.*) RAY_CMD=("${RL_PYTHON:-python3}" "$(dirname "$0")/ray_loopback.py") ;;
esac

RAY_PID=""
TMP_DIR=""
stop_ray() {
    if [ -n "$RAY_PID" ] && kill -0 "$RAY_PID" 2>/dev/null; then
        log "stopping Ray (pid $RAY_PID)"
        kill -TERM "$RAY_PID" 2>/dev/null
        wait "$RAY_PID" 2>/dev/null
    fi
    RAY_PID=""
    keep_logs
    if [ -n "$TMP_DIR" ]; then rm -rf "$TMP_DIR"; fi
}
# A node's Ray session logs (raylet, GCS, every worker's stdout/stderr) go to the job's log dir on
# shared storage, as ray-logs-<node rank>: at the job's end (ray_job.sbatch runs `keep-logs` on every
# node while Ray still runs) and again when Ray stops, before the private temp dir is removed.
keep_logs() {  # $1 = a Ray temp dir of this job (default: this process's)
    local dir=${1:-$TMP_DIR}
    local src="$dir/session_latest/logs" dest
    if [ -n "$dir" ] && [ -n "${RAY_LOG_DIR:-}" ] && [ -d "$src" ]; then
        dest="$RAY_LOG_DIR/ray-logs-${dir##*-}"
        mkdir -p "$dest" && cp -rL "$src/." "$dest/" 2>/dev/null
        log "Ray logs kept in $dest"
    fi
    return 0
}
trap 'stop_ray; exit 143' TERM INT
trap 'stop_ray' EXIT

fresh_tmp_dir() {  # $1 = node rank
    TMP_DIR="$RAY_TMP_BASE/ray-${SLURM_CLUSTER_NAME:-slurm}-${SLURM_JOB_ID:-0}-$1"
    rm -rf "$TMP_DIR"
    mkdir -p "$TMP_DIR" || die "cannot create Ray temp dir $TMP_DIR"
}

start_head() {
    [ -n "${RAY_LOG_DIR:-}" ] || die "RAY_LOG_DIR (shared storage) is not set"
    local ipif ip
    ipif=$(node_ip) || exit 1
    ip=${ipif%% *}
    fresh_tmp_dir 0
    local b=$((RAY_NODE_PORT_BASE))
    log "starting Ray head on $ip:$RAY_PORT (temp dir $TMP_DIR)"
    # shellcheck disable=SC2046  # the helpers print whitespace-separated flags on purpose
    "${RAY_CMD[@]}" start --head --block --node-ip-address="$ip" --port="$RAY_PORT" \
        --ray-client-server-port=$((b + 6)) --dashboard-port=$((b + 7)) --include-dashboard=false \
        --temp-dir="$TMP_DIR" $(port_args 0) $(common_args) &
    RAY_PID=$!
    local deadline=$((SECONDS + RAY_START_TIMEOUT_S))
    until "${RAY_CMD[@]}" status --address="$ip:$RAY_PORT" >/dev/null 2>&1; do
        kill -0 "$RAY_PID" 2>/dev/null || die "ray start --head exited before the head answered"
        [ "$SECONDS" -lt "$deadline" ] || die "Ray head did not answer within ${RAY_START_TIMEOUT_S}s"
        sleep 1
    done
    # Readiness goes through shared storage, written atomically: workers never see a partial file.
    echo "$ip:$RAY_PORT" >"$RAY_LOG_DIR/head.ready.tmp" && mv "$RAY_LOG_DIR/head.ready.tmp" "$RAY_LOG_DIR/head.ready"
    log "head ready at $ip:$RAY_PORT"
    wait "$RAY_PID"
    local rc=$?
    RAY_PID=""
    log "ray start --head exited with $rc"
    exit "$rc"
}

start_worker() {
    [ -n "${RAY_LOG_DIR:-}" ] || die "RAY_LOG_DIR (shared storage) is not set"
    local rank=$((${SLURM_PROCID:-0} + 1)) ready="$RAY_LOG_DIR/head.ready"
    local deadline=$((SECONDS + RAY_START_TIMEOUT_S))
    until [ -s "$ready" ]; do
        [ "$SECONDS" -lt "$deadline" ] || die "no $ready after ${RAY_START_TIMEOUT_S}s: the head failed, or $RAY_LOG_DIR is not on storage shared by all nodes"
        sleep 1
    done
    local address ipif ip
    address=$(cat "$ready")
    ipif=$(node_ip) || exit 1
    ip=${ipif%% *}
    local attempt rc started
    for attempt in 1 2 3; do
        fresh_tmp_dir "$rank"
        log "joining $address as worker $rank from $ip (attempt $attempt)"
        started=$SECONDS
        # shellcheck disable=SC2046  # the helpers print whitespace-separated flags on purpose
        "${RAY_CMD[@]}" start --block --address="$address" --node-ip-address="$ip" --temp-dir="$TMP_DIR" \
            $(port_args "$rank") $(common_args) &
        RAY_PID=$!
        wait "$RAY_PID"
        rc=$?
        RAY_PID=""
        # A quick failure is a join that did not happen (head busy, GCS not reachable yet): retry.
        if [ $((SECONDS - started)) -gt 30 ] || [ "$rc" -eq 0 ]; then break; fi
        log "ray start exited with $rc after $((SECONDS - started))s; retrying in 5s"
        sleep 5
    done
    log "ray start (worker) exited with $rc"
    exit "$rc"
}

# Children (Ray workers) must not inherit the step's MPI/PMI state (docs B.6).
for v in $(compgen -e | grep -E '^(PMI|PMIX|OMPI)_'); do unset "$v"; done

case "${1:-}" in
    node-ip) node_ip ;;
    head) start_head ;;
    worker) start_worker ;;
    keep-logs)
        for d in "$RAY_TMP_BASE/ray-${SLURM_CLUSTER_NAME:-slurm}-${SLURM_JOB_ID:-0}"-*; do keep_logs "$d"; done
        ;;
    *) die "usage: ray_node.sh node-ip|head|worker|keep-logs" ;;
esac
