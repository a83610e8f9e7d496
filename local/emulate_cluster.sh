#!/usr/bin/env bash
# Emulate a cluster of N nodes on this machine: N network namespaces joined by veth pairs through a
# bridge, each node's link limited with a token-bucket filter (tc tbf) in both directions, then run
# a command in every node at once and remove everything again on exit. Needs root (ip netns, tc).
#
#   local/emulate_cluster.sh --nodes 2 --rate 100mbit -- COMMAND [ARGS...]
#   local/emulate_cluster.sh --nodes 2 --rate 500mbit,100mbit -- ...   (one rate per node: a slow node)
#
# COMMAND runs in node i with NODE_RANK=i, NNODES=N, NODE_ADDR (this node's address), MASTER_ADDR
# (node 0's address) and GLOO_SOCKET_IFNAME=eth0 in its environment, so gloo traffic between nodes
# really crosses the limited links (torchrun --nnodes $NNODES --local-addr $NODE_ADDR
# --rdzv-backend c10d --rdzv-endpoint $MASTER_ADDR:29400 ...). Latency cannot be added: this
# kernel has no netem. The exit status is the first failing node's, else 0.
set -euo pipefail

nodes=2
rate=100mbit
prefix=apc
subnet=10.77.0
usage="Usage: $0 [--nodes N] [--rate RATE (tc syntax, e.g. 100mbit)] [--prefix NAME] -- COMMAND [ARGS...]"
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) nodes=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --prefix) prefix=$2; shift 2 ;;
    --) shift; break ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
[ $# -gt 0 ] || { echo "$usage" >&2; exit 2; }
IFS=, read -ra rates <<< "$rate"
if [ "${#rates[@]}" -ne 1 ] && [ "${#rates[@]}" -ne "$nodes" ]; then
  echo "ERROR: --rate $rate: give one rate, or one per node ($nodes)" >&2
  exit 2
fi
if [ "$(id -u)" != 0 ]; then
  echo "ERROR: emulate_cluster.sh needs root (network namespaces and tc); run without emulation instead" >&2
  exit 3
fi
for tool in ip tc; do
  command -v $tool >/dev/null || { echo "ERROR: '$tool' not found (Debian package iproute2)" >&2; exit 3; }
done
# One run per cluster name at a time: a second one would delete this one's namespaces as it starts.
# The lock is held until this script and the commands it started have ended.
lock=/tmp/emulate_cluster-${prefix}.lock
exec 9>"$lock"
if ! flock -n 9; then
  echo "emulate_cluster: another run holds the emulated cluster '$prefix' ($lock); waiting for it" >&2
  flock 9
fi

bridge=${prefix}-br
cleanup() {
  for i in $(seq 0 $((nodes - 1))); do
    ip netns del "${prefix}${i}" 2>/dev/null || true
    ip link del "${prefix}${i}h" 2>/dev/null || true
  done
  ip link del "$bridge" 2>/dev/null || true
}
trap cleanup EXIT
cleanup  # leftovers of an earlier run that was killed

ip link add "$bridge" type bridge
ip link set "$bridge" up
# tbf needs a bucket of at least rate/HZ; 64 kB covers up to about 500 Mbit/s at HZ=1000.
for i in $(seq 0 $((nodes - 1))); do
  ns=${prefix}${i}
  ip netns add "$ns"
  ip link add "${ns}h" type veth peer name "${ns}n"
  ip link set "${ns}h" master "$bridge"
  ip link set "${ns}h" up
  ip link set "${ns}n" netns "$ns"
  ip -n "$ns" link set "${ns}n" name eth0
  ip -n "$ns" addr add "${subnet}.$((i + 1))/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
  r=${rates[0]}
  [ "${#rates[@]}" -gt 1 ] && r=${rates[$i]}
  tc qdisc add dev "${ns}h" root tbf rate "$r" burst 64kb latency 400ms           # to the node
  ip netns exec "$ns" tc qdisc add dev eth0 root tbf rate "$r" burst 64kb latency 400ms  # from it
done
echo "emulate_cluster: $nodes nodes ${subnet}.1-${subnet}.$nodes, links limited to $rate each way (node order)" >&2

pids=()
for i in $(seq 0 $((nodes - 1))); do
  ip netns exec "${prefix}${i}" env NODE_RANK=$i NNODES=$nodes NODE_ADDR="${subnet}.$((i + 1))" \
    MASTER_ADDR="${subnet}.1" GLOO_SOCKET_IFNAME=eth0 "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  rc=0
  wait "$pid" || rc=$?
  if [ $status -eq 0 ] && [ $rc -ne 0 ]; then status=$rc; fi
done
exit $status
