#!/usr/bin/env bash
# The main job: installs what it needs (idempotent), then runs `ebpf-bridge demo`: example
# services, the agent tracing them, a burst of traffic from several tenants, spans in the
# terminal and in an OTLP-JSON-lines file. Extra arguments go to `ebpf-bridge demo`.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
bash scripts/install.sh
exec "$here/.venv/bin/ebpf-bridge" demo "$@"
