#!/bin/bash
# The systemd end-to-end test (make systemd-e2e; opt-in: it builds a Debian
# root file system the first time, about 3 minutes and 250 MB, cached in
# $VMCRYPTD_E2E_ROOTFS). It boots that tree with systemd as PID 1 in
# systemd-nspawn, installs the package there and drives vmcryptd.service
# with systemctl (inside.sh: start with Type=notify, views, reload, lock,
# restart, security score, stop). Prints inside.sh's transcript; exit 0
# only if it ends in "E2E PASS".
#
#   run.sh DEB
set -euo pipefail
deb=$(realpath "$1")
here=$(cd "$(dirname "$0")" && pwd)
cache=${VMCRYPTD_E2E_ROOTFS:-/var/tmp/vmcryptd-e2e-rootfs}
suite=${VMCRYPTD_E2E_SUITE:-bookworm}
mirror=${VMCRYPTD_E2E_MIRROR:-http://deb.debian.org/debian}

if [ "$(id -u)" -ne 0 ]; then
	echo "systemd-e2e: needs root (systemd-nspawn)" >&2
	exit 1
fi
for cmd in systemd-nspawn debootstrap; do
	if ! command -v $cmd >/dev/null; then
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd-container debootstrap >/dev/null
		break
	fi
done
if [ ! -x "$cache/sbin/init" ]; then
	echo "systemd-e2e: building a $suite root file system in $cache (once)" >&2
	rm -rf "$cache.tmp"
	debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,fuse3,procps "$suite" "$cache.tmp" "$mirror" >&2
	rm -rf "$cache"
	mv "$cache.tmp" "$cache"
fi

work=$(mktemp -d /var/tmp/vmcryptd-e2e.XXXXXX)
cleanup() {
	# nspawn unmounts everything it mounted when the container ends;
	# check, so a failed run leaves nothing mounted behind.
	if grep -q " $work/" /proc/mounts; then
		grep " $work/" /proc/mounts | awk '{print $2}' | sort -r | xargs -r -n1 umount -l
	fi
	rm -rf "$work"
}
trap cleanup EXIT
cp -a "$cache" "$work/root"
mkdir "$work/e2e"
cp "$deb" "$work/e2e/vmcryptd.deb"
cp "$here/inside.sh" "$work/e2e/inside.sh"
cat > "$work/root/etc/systemd/system/vmcryptd-e2e.service" <<'UNIT'
[Unit]
Description=vmcryptd systemd end-to-end test
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/e2e/inside.sh
UNIT
mkdir -p "$work/root/etc/systemd/system/multi-user.target.wants"
ln -s ../vmcryptd-e2e.service "$work/root/etc/systemd/system/multi-user.target.wants/vmcryptd-e2e.service"

# No host systemd here is assumed: --register=no --keep-unit. The daemon
# needs /dev/fuse and CAP_IPC_LOCK (nspawn keeps CAP_SYS_ADMIN by default).
rc=0
timeout 600 systemd-nspawn -q -D "$work/root" --boot --register=no --keep-unit \
	--bind="$work/e2e:/e2e" --bind=/dev/fuse --capability=CAP_IPC_LOCK \
	> "$work/console.log" 2>&1 || rc=$?
if [ ! -s "$work/e2e/result.txt" ]; then
	echo "systemd-e2e: the container produced no result (nspawn exit $rc); console:" >&2
	tail -40 "$work/console.log" >&2
	exit 1
fi
cat "$work/e2e/result.txt"
[ -f "$work/e2e/security.txt" ] && { echo "== systemd-analyze security (full)"; cat "$work/e2e/security.txt"; }
tail -1 "$work/e2e/result.txt" | grep -qx "E2E PASS"
