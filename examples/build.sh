#!/usr/bin/env bash
# Builds the compiled example services into examples/build/ (git-ignored), idempotently: a
# step runs only when its output is missing or older than its sources.
#   Go pricing:     GOPATH mode against Debian's golang-golang-x-net-dev (h2c), no module proxy
#                   (go.mod is for module-mode builds elsewhere; GO111MODULE=off ignores it)
#   Java inventory: plain javac, no Maven; JDBC comes from Debian's libpostgresql-jdbc-java
#   Node storefront: nothing to build (Node's http module only, no npm dependencies)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out="$here/build"
mkdir -p "$out"
log() { printf '\033[1m[build]\033[0m %s\n' "$*"; }

# stale OUTPUT SOURCE...: true when OUTPUT is missing or any SOURCE is newer.
stale() {
  local target=$1; shift
  [ -e "$target" ] || return 0
  for src in "$@"; do [ "$src" -nt "$target" ] && return 0; done
  return 1
}

pricing_src=("$here"/go/pricing/*.go "$here/go/pricing/go.mod")
if stale "$out/pricing" "${pricing_src[@]}"; then
  log "go build examples/go/pricing -> $out/pricing"
  (cd "$here/go/pricing" && GO111MODULE=off GOPATH="/usr/share/gocode" \
     GOCACHE="${GOCACHE:-$out/.gocache}" go build -o "$out/pricing.tmp" . 2>&1 \
     || { echo "go build failed: is golang-golang-x-net-dev installed?" >&2; exit 1; })
  mv "$out/pricing.tmp" "$out/pricing"
fi

inventory_src=("$here"/java/inventory/*.java)
if stale "$out/java/Inventory.class" "${inventory_src[@]}"; then
  log "javac examples/java/inventory -> $out/java"
  rm -rf "$out/java.tmp" && mkdir -p "$out/java.tmp"
  javac -d "$out/java.tmp" "${inventory_src[@]}"
  rm -rf "$out/java" && mv "$out/java.tmp" "$out/java"
fi
