#!/bin/sh
# Run a command with FILE bind-mounted over TARGET, in the caller's (private) mount namespace:
#   unshare --mount --propagation private sh in_mount_ns.sh FILE TARGET CMD...
# As in a container, the process then maps a file the host path does not name.
set -e
mount --bind "$1" "$2"
shift 2
exec "$@"
