#!/usr/bin/env bash
# The test command: installs everything (idempotent), then lint, types, and the whole suite,
# including end-to-end tests that load real eBPF programs and run real servers and clients.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
bash scripts/install.sh
py="$here/.venv/bin"
echo "== ruff"
"$py/ruff" check .
echo "== mypy (strict for bridge/ and sdk_side/)"
"$py/mypy" bridge sdk_side kernel_side bpf
echo "== pytest"
set +e
# Everything the suite needs was just installed: a skipped test is a failure here (tests/conftest.py).
EBPF_BRIDGE_REQUIRE_ALL=1 "$py/python" -m pytest -q -p no:cacheprovider -rfE "$@"
rc=$?
set -e
# pytest exits 5 when it collected nothing: a suite that ran no test is a failure here.
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
exit "$rc"
