#!/usr/bin/env bash
# Installs the system packages the real-server tests use, from Debian's archive, once:
#   Slurm 22.05 + munge (tests/test_slurm.py) and Prometheus + Pushgateway (monitoring tests).
# Idempotent and quiet: does nothing when every package is already installed. Daemons are NOT
# started or enabled (the tests run the binaries themselves, in temporary folders).
# Needs root (or sudo). Usage: deploy/ci/install-system-packages.sh
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge prometheus prometheus-pushgateway)

missing=()
for p in "${PACKAGES[@]}"; do
    if [[ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" != "installed" ]]; then
        missing+=("$p")
    fi
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { echo "install-system-packages: need root or sudo to install ${missing[*]}" >&2; exit 1; }
    SUDO=(sudo)
fi

echo "installing system packages: ${missing[*]}" >&2
# Keep maintainer scripts from starting the daemons (no init system in CI containers, and the
# tests want no background Slurm/Prometheus). policy-rc.d is restored afterwards.
policy=/usr/sbin/policy-rc.d
had_policy=0
[[ -e $policy ]] && had_policy=1
if [[ $had_policy -eq 0 ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
    "${SUDO[@]}" chmod 755 "$policy"
    trap '"${SUDO[@]}" rm -f "$policy"' EXIT
fi

export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
if ! { "${SUDO[@]}" apt-get update -qq && \
       "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "install-system-packages: apt-get failed (output above)" >&2
    exit 1
fi
rm -f "$log"
