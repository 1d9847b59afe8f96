#!/usr/bin/env bash
# The README's run command: a lab KMS, a daemon with host encryption mode
# on, in ./demo. Re-running restarts it with the same keys.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${DEMO_DIR:-$PWD/demo}"
if [ "$(id -u)" -ne 0 ]; then
	echo "demo: run as root (the daemon mlocks keys and will mount FUSE views)" >&2
	exit 1
fi
bin/vmcryptd lab up --dir "$dir"
echo
echo "Next:"
echo "  source $dir/lab.env"
echo "  bin/vmcryptd status"
echo "  bin/vmcryptd kms status"
echo "  bin/vmcryptd bench"
echo "  bin/vmcryptd lab down --dir $dir"
