#!/usr/bin/env bash
# Installs the Debian packages the test suite and the demo need, if any of
# their commands is missing. Root + apt-get does it; otherwise it says what
# to run and fails, so a CI run never silently skips a peer.
set -euo pipefail

# command -> package that provides it
declare -A need=(
	[qemu-img]=qemu-utils
	[qemu-io]=qemu-utils
	[qemu-nbd]=qemu-utils
	[nbdinfo]=libnbd-bin
	[nbdcopy]=libnbd-bin
	[nbdkit]=nbdkit
	[pykmip-server]=python3-pykmip
	[fio]=fio
	[gocryptfs]=gocryptfs
	[fusermount3]=fuse3
	[openssl]=openssl
	[zsh]=zsh
	[fish]=fish
	[systemd-analyze]=systemd
	[groff]=groff-base
	[dpkg-deb]=dpkg
)

# `install-deps.sh guest` adds what the opt-in QEMU guest boot test
# (make guest) needs: a system emulator, a static busybox and a kernel.
if [ "${1:-}" = guest ]; then
	need[qemu-system-x86_64]=qemu-system-x86
	need[busybox]=busybox-static
fi

missing=()
if [ "${1:-}" = guest ] && ! compgen -G '/boot/vmlinuz-*' >/dev/null; then
	missing+=(linux-image-cloud-amd64)
fi
for cmd in "${!need[@]}"; do
	command -v "$cmd" >/dev/null 2>&1 || missing+=("${need[$cmd]}")
done
# FORMAT.md section 6's recovery scripts run under Debian's python3.
/usr/bin/python3 -c 'import cryptography.hazmat.primitives.ciphers.aead' >/dev/null 2>&1 || missing+=(python3-cryptography)
if [ ${#missing[@]} -eq 0 ]; then
	exit 0
fi
# de-duplicate
mapfile -t pkgs < <(printf '%s\n' "${missing[@]}" | sort -u)
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
	echo "install-deps: missing packages: ${pkgs[*]} (run: apt-get install -y ${pkgs[*]} as root)" >&2
	exit 1
fi
echo "install-deps: installing ${pkgs[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
