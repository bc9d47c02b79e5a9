#!/usr/bin/env bash
# Kernel link emulation between two private network namespaces: "device" <-> "edge".
#
# Why: scripts/netem.py emulates a link in userspace (no root, TCP only, no packet loss).
# Where the kernel has sch_netem, this gives packet-level emulation (delay, jitter, rate,
# loss) instead. Layout:
#
#   netns ${PREFIX}-dev : es-dev0  10.203.77.1/30  --veth--  es-edge0 10.203.77.2/30 : netns ${PREFIX}-edge
#
# The veth pair is created directly inside the namespaces and the /30 exists only there:
# nothing outside the two namespaces this script creates is ever touched (every `ip`/`tc`
# call that changes a link runs with `ip -n <our namespace>`). Egress of es-dev0 is the
# uplink, egress of es-edge0 the downlink, each with the profile's one-way delay.
#
# Profiles come from `scripts/netem.py --list-profiles --json` (one table for both
# emulators). If netem is missing (checked by a dry attempt on the loopback of a throw-away
# namespace), `up` stops with a message, unless --allow-tbf is given: then only the rate is
# shaped (tbf) and delay/jitter/loss are NOT applied - prefer scripts/netem.py then.
# Differences from the proxy: kernel netem jitter may reorder packets (TCP copes; the proxy
# never reorders bytes), and kernel rates count IP/TCP headers (goodput ~4 % below the rate).
#
# Usage (root):
#   scripts/netem_ns.sh check
#   scripts/netem_ns.sh up --profile rtt20-10mbit [--loss-pct 0.1] [--allow-tbf]
#   scripts/netem_ns.sh status
#   scripts/netem_ns.sh down
#   ip netns exec edgespec-edge <edge server listening on 10.203.77.2>
#   ip netns exec edgespec-dev  <device client connecting to 10.203.77.2>
#
# Environment: NETEM_NS_PREFIX (default edgespec), NETEM_NS_NET (first three octets of the
# /30, default 10.203.77), PYTHON (default python3; netem.py needs only the stdlib).
set -euo pipefail

PREFIX=${NETEM_NS_PREFIX:-edgespec}
NS_DEV="${PREFIX}-dev"
NS_EDGE="${PREFIX}-edge"
IF_DEV=es-dev0
IF_EDGE=es-edge0
NET=${NETEM_NS_NET:-10.203.77}
DEV_IP="${NET}.1"
EDGE_IP="${NET}.2"
PY=${PYTHON:-python3}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NETEM_PY="$HERE/netem.py"
STATE="/run/${PREFIX}-netem.env"

die() { echo "netem_ns: error: $1" >&2; exit "${2:-1}"; }
say() { echo "netem_ns: $*"; }

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
    echo "Subcommands: check | up --profile NAME [--loss-pct P] [--allow-tbf] | status | down | help"
}

need_root() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (ip netns / tc)"
    command -v ip >/dev/null && command -v tc >/dev/null || die "needs iproute2 (ip, tc)"
    [[ $NET =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || die "NETEM_NS_NET must be 3 octets"
}

ns_exists() { ip netns list | awk '{print $1}' | grep -qx -- "$1"; }

# Dry attempt: add a netem qdisc to the loopback of a namespace that exists only for this.
have_netem() {
    local probe="${PREFIX}-probe-$$" ok=1
    ip netns add "$probe"
    if ip -n "$probe" link set lo up && \
       ip netns exec "$probe" tc qdisc add dev lo root netem delay 1ms 2>/dev/null; then
        ok=0
    fi
    ip netns del "$probe"
    return $ok
}

# Prints: delay_ms jitter_ms up_mbit down_mbit burst_up_bytes burst_down_bytes
profile_params() {
    "$PY" "$NETEM_PY" --list-profiles --json | "$PY" -c '
import json, sys
name = sys.argv[1]
for p in json.load(sys.stdin)["profiles"]:
    if p["name"] == name:
        print(p["delay_ms"], p["jitter_ms"], p["up_mbit"], p["down_mbit"],
              p["burst_up_bytes"], p["burst_down_bytes"])
        break
else:
    sys.exit("unknown profile %r (see scripts/netem.py --list-profiles)" % name)
' "$1"
}

create_topology() {
    ns_exists "$NS_DEV" || ip netns add "$NS_DEV"
    ns_exists "$NS_EDGE" || ip netns add "$NS_EDGE"
    if ! ip -n "$NS_DEV" link show "$IF_DEV" >/dev/null 2>&1; then
        ip -n "$NS_DEV" link add "$IF_DEV" type veth peer name "$IF_EDGE" netns "$NS_EDGE"
    fi
    ip -n "$NS_DEV" addr replace "$DEV_IP/30" dev "$IF_DEV"
    ip -n "$NS_EDGE" addr replace "$EDGE_IP/30" dev "$IF_EDGE"
    local ns
    for ns in "$NS_DEV" "$NS_EDGE"; do ip -n "$ns" link set lo up; done
    ip -n "$NS_DEV" link set "$IF_DEV" up
    ip -n "$NS_EDGE" link set "$IF_EDGE" up
}

# shape NS IF KIND DELAY JITTER MBIT BURST LOSS
shape() {
    local ns=$1 dev=$2 kind=$3 delay=$4 jitter=$5 mbit=$6 burst=$7 loss=$8
    if [[ $kind == netem ]]; then
        local args=(delay "${delay}ms")
        [[ $jitter == 0 || $jitter == 0.0 ]] || args+=("${jitter}ms")
        [[ $loss == 0 ]] || args+=(loss "${loss}%")
        [[ $mbit == None ]] || args+=(rate "${mbit}mbit")
        ip netns exec "$ns" tc qdisc replace dev "$dev" root netem "${args[@]}" limit 100000
    else
        [[ $mbit == None ]] && { ip netns exec "$ns" tc qdisc del dev "$dev" root 2>/dev/null || true; return; }
        ip netns exec "$ns" tc qdisc replace dev "$dev" root tbf rate "${mbit}mbit" \
            burst "$burst" latency 100ms
    fi
}

cmd_up() {
    local profile="" loss=0 allow_tbf=0
    while [[ $# -gt 0 ]]; do
        case $1 in
            --profile) profile=${2:?}; shift 2 ;;
            --loss-pct) loss=${2:?}; shift 2 ;;
            --allow-tbf) allow_tbf=1; shift ;;
            *) die "unknown option $1" ;;
        esac
    done
    [[ -n $profile ]] || die "up needs --profile NAME"
    [[ $loss =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--loss-pct must be a number"
    need_root
    local params
    params=$(profile_params "$profile") || exit 1
    read -r delay jitter up down burst_up burst_down <<<"$params"

    local kind emulator
    if have_netem; then
        kind=netem; emulator=kernel-netem
    elif [[ $allow_tbf == 1 ]]; then
        kind=tbf; emulator=kernel-tbf-rate-only
        say "WARNING: this kernel has no sch_netem: shaping the RATE ONLY with tbf;" \
            "delay ${delay} ms, jitter ${jitter} ms and loss ${loss}% are NOT applied."
        say "For delay/jitter use the userspace proxy: scripts/netem.py --profile $profile ..."
    else
        die "this kernel has no sch_netem ('tc qdisc add ... netem' fails), so delay/jitter/loss
cannot be emulated here. Use the userspace proxy instead:
    scripts/netem.py --profile $profile --listen 127.0.0.1:PORT --upstream 127.0.0.1:PORT
or rerun with --allow-tbf to shape only the rate inside the namespaces." 3
    fi
    create_topology
    shape "$NS_DEV" "$IF_DEV" "$kind" "$delay" "$jitter" "$up" "$burst_up" "$loss"
    shape "$NS_EDGE" "$IF_EDGE" "$kind" "$delay" "$jitter" "$down" "$burst_down" "$loss"
    printf 'profile=%s\nemulator=%s\nloss_pct=%s\n' "$profile" "$emulator" "$loss" >"$STATE"
    say "up: profile=$profile emulator=$emulator $NS_DEV/$IF_DEV=$DEV_IP <-> $NS_EDGE/$IF_EDGE=$EDGE_IP"
    say "run: ip netns exec $NS_EDGE <server on $EDGE_IP>; ip netns exec $NS_DEV <client to $EDGE_IP>"
}

cmd_down() {
    need_root
    local ns
    for ns in "$NS_DEV" "$NS_EDGE"; do  # deleting a namespace also deletes its veth end
        if ns_exists "$ns"; then ip netns del "$ns" && say "deleted netns $ns"; fi
    done
    rm -f "$STATE"
}

cmd_status() {
    need_root
    if ! ns_exists "$NS_DEV" && ! ns_exists "$NS_EDGE"; then say "down"; return 0; fi
    [[ -f $STATE ]] && sed 's/^/netem_ns: /' "$STATE"
    local ns dev
    for ns in "$NS_DEV" "$NS_EDGE"; do
        ns_exists "$ns" || { say "$ns: missing"; continue; }
        dev=$IF_DEV; [[ $ns == "$NS_EDGE" ]] && dev=$IF_EDGE
        echo "== $ns"
        ip -n "$ns" -brief addr show dev "$dev" 2>/dev/null || echo "  ($dev missing)"
        ip netns exec "$ns" tc qdisc show dev "$dev" 2>/dev/null || true
    done
}

cmd_check() {
    need_root
    if have_netem; then say "sch_netem available: 'up' will emulate delay/jitter/rate/loss"
    else say "sch_netem NOT available: 'up' needs --allow-tbf (rate only) or use scripts/netem.py"
    fi
}

case ${1:-help} in
    up) shift; cmd_up "$@" ;;
    down) cmd_down ;;
    status) cmd_status ;;
    check) cmd_check ;;
    help|-h|--help) usage ;;
    *) usage >&2; exit 2 ;;
esac
