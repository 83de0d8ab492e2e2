#!/usr/bin/env bash
# Idempotent setup for a fresh Debian 12 machine, as root: system packages (BCC from Debian,
# kernel-header fallback, the servers the tests and demo run), tracefs/bpffs mounts, and the
# project venv. Safe to run again: each step checks before it acts.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
log() { printf '\033[1m[install]\033[0m %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "install.sh must run as root (it installs packages and mounts bpffs/tracefs): sudo $0" >&2
  exit 1
fi

APT_PACKAGES=(
  python3-bpfcc bpfcc-tools libbpfcc linux-headers-amd64 python3-venv python3-dev
  nginx-light curl wrk redis-server postgresql mariadb-server
  golang-go default-jdk-headless nodejs iproute2 util-linux
  golang-golang-x-net-dev libpostgresql-jdbc-java gcc libc6-dev openssl
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  apt-get update -qq
  # Debian's packages start their services on install; the tests start their own instances.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian enables these services at install; stop the system copies so ports are free and the
# tests' own instances are the only ones running.
for svc in nginx redis-server mariadb postgresql; do
  if command -v service >/dev/null 2>&1; then service "$svc" stop >/dev/null 2>&1 || true; fi
done

# Kernel headers: this kernel ships none and has CONFIG_IKHEADERS off. Debian's amd64 headers are
# close enough for tracepoints and uprobes (never for walking kernel structs).
kver=$(uname -r)
if [ ! -e "/lib/modules/$kver/build/include" ] && [ -z "${BCC_KERNEL_SOURCE:-}" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$hdr" ] || [ -z "$common" ]; then
    echo "no /usr/src/linux-headers-*-amd64 found after installing linux-headers-amd64" >&2
    exit 1
  fi
  log "kernel headers fallback: /lib/modules/$kver/{build,source} -> $hdr, $common"
  mkdir -p "/lib/modules/$kver"
  ln -sfn "$hdr" "/lib/modules/$kver/build"
  ln -sfn "$common" "/lib/modules/$kver/source"
fi

mountpoint -q /sys/kernel/tracing || { log "mount tracefs"; mount -t tracefs tracefs /sys/kernel/tracing; }
mountpoint -q /sys/fs/bpf || { log "mount bpffs"; mount -t bpf bpf /sys/fs/bpf; }
# cgroup v2, for the opt-in traceparent injector's sock_ops program (kernel_side/inject.py).
if ! grep -q " - cgroup2 " /proc/self/mountinfo; then
  log "mount cgroup2 on /sys/fs/cgroup/unified"
  { mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 none /sys/fs/cgroup/unified; } ||
    log "could not mount cgroup2: --inject-traceparent will not be available"
fi
mountpoint -q /sys/kernel/security 2>/dev/null || mount -t securityfs securityfs /sys/kernel/security 2>/dev/null || true

# The venv sees Debian's BCC (python3-bpfcc) through --system-site-packages; BCC is not on PyPI.
venv="$here/.venv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import bcc' 2>/dev/null; then
  log "create venv $venv"
  rm -rf "$venv"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
# setup.py and the C accelerator are part of the stamp: a change to either rebuilds it.
stamp="$venv/.installed-$(cat pyproject.toml setup.py sdk_side/_fastbpf.c | sha256sum | cut -c1-16)"
if [ ! -e "$stamp" ]; then
  log "pip install -e .[dev]"
  "$venv/bin/pip" install -q --upgrade pip >/dev/null
  "$venv/bin/pip" install -q -e ".[dev]"
  rm -f "$venv"/.installed-*
  touch "$stamp"
fi
# The demo's compiled example services (Go pricing, Java inventory); skips what is up to date.
bash "$here/examples/build.sh"
log "ready: $venv"
