#!/bin/bash
# Runs inside a Debian container booted with systemd as PID 1 (see run.sh):
# installs the vmcryptd package and drives vmcryptd.service the way an
# administrator would. Every step's outcome goes to /e2e/result.txt; the
# last line is "E2E PASS" only if every step passed. The container powers
# off at the end whatever happens.
set -u
out=/e2e/result.txt
: > "$out"
log() { echo "$*" >> "$out"; }
fail() { log "FAIL: $*"; journalctl -u vmcryptd --no-pager -n 60 >> "$out" 2>&1; systemctl poweroff; exit 1; }
step() { log "== $*"; }
trap 'fail "unexpected exit at line $LINENO"' ERR
set -E

step "install the package"
dpkg -i /e2e/vmcryptd.deb >> "$out" 2>&1 || fail "dpkg -i"
vmcryptd version >> "$out" 2>&1 || fail "vmcryptd version"
systemctl is-enabled vmcryptd >> "$out" 2>&1 && fail "the package enabled the service by itself"
systemctl is-active vmcryptd >/dev/null 2>&1 && fail "the package started the service by itself"

step "a lab KMS as a transient unit"
vmcryptd kms init --dir /var/lib/labkms >> "$out" 2>&1 || fail "kms init"
systemd-run --unit=labkms --property=Type=exec vmcryptd kms serve --dir /var/lib/labkms --listen 127.0.0.1:5696 >> "$out" 2>&1 || fail "labkms"
for i in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/5696) 2>/dev/null && break; sleep 0.2; done

step "configure and start vmcryptd.service (Type=notify)"
mkdir -p /srv/ds1 /srv/ds2
base_cfg() {
	cat <<CFG
default_provider = "lab"
[[kms]]
name = "lab"
servers = ["127.0.0.1:5696"]
ca_file = "/var/lib/labkms/ca.pem"
cert_file = "/var/lib/labkms/client.pem"
key_file = "/var/lib/labkms/client-key.pem"
[[datastores]]
name = "ds1"
path = "/srv/ds1"
[[mounts]]
datastore = "ds1"
mountpoint = "/srv/view1"
CFG
}
base_cfg > /etc/vmcryptd/vmcryptd.toml
t0=$(date +%s%N)
systemctl start vmcryptd || fail "systemctl start"
log "start returned after $(( ($(date +%s%N) - t0) / 1000000 )) ms"
systemctl show -p ActiveState -p SubState -p Type -p StatusText vmcryptd >> "$out"
[ "$(systemctl show -p ActiveState --value vmcryptd)" = active ] || fail "not active after start"
grep -q " /srv/view1 fuse" /proc/mounts || fail "configured view not mounted when start returned (READY=1 must follow the mounts)"
pid=$(systemctl show -p MainPID --value vmcryptd)
[ "$(readlink /proc/$pid/ns/mnt)" = "$(readlink /proc/1/ns/mnt)" ] || fail "the daemon runs in its own mount namespace: its views would not reach the host"
log "mount namespace: the daemon shares PID 1's ($(readlink /proc/$pid/ns/mnt))"
grep -E "VmLck|CapBnd|NoNewPrivs|Seccomp:" /proc/$pid/status >> "$out"
grep -q "^Seccomp:.*2" /proc/$pid/status || fail "no seccomp filter on the daemon"
log "core dump limit: $(grep 'Max core' /proc/$pid/limits)"

step "encrypt a VM and read it through the view"
vmcryptd host encryption enable >> "$out" 2>&1 || fail "host encryption enable"
vmcryptd vm create /srv/ds1/vm1 --name vm1 --disk 8M --encrypt >> "$out" 2>&1 || fail "vm create"
head -c 8 /srv/ds1/vm1/vm1.nvram | grep -q VMCRYPTD || fail "nvram at rest is not a container"
dd if=/dev/urandom of=/e2e/pattern bs=64k count=16 status=none
dd if=/e2e/pattern of=/srv/view1/vm1/vm1-flat.vmdk bs=64k conv=notrunc,fsync status=none || fail "write through the view"
cmp -n 1048576 /e2e/pattern /srv/view1/vm1/vm1-flat.vmdk || fail "read back through the view"
cmp -s -n 1048576 /e2e/pattern /srv/ds1/vm1/vm1-flat.vmdk && fail "plaintext at rest"
log "VmLck after keys: $(grep VmLck /proc/$pid/status)"

step "systemctl reload: a role, a datastore and its view"
{ base_cfg; cat <<CFG
[[datastores]]
name = "ds2"
path = "/srv/ds2"
[[mounts]]
datastore = "ds2"
mountpoint = "/srv/view2"
[[roles]]
uid = 65534
role = "ReadOnly"
CFG
} > /etc/vmcryptd/vmcryptd.toml
systemctl reload vmcryptd || fail "systemctl reload"
for i in $(seq 50); do grep -q " /srv/view2 fuse" /proc/mounts && break; sleep 0.1; done
grep -q " /srv/view2 fuse" /proc/mounts || fail "reload did not mount the new view"
[ "$(systemctl show -p MainPID --value vmcryptd)" = "$pid" ] || fail "reload restarted the daemon"
journalctl -u vmcryptd --no-pager -o cat | grep '"configuration reloaded"' | tail -1 >> "$out"
echo 'oops = [' >> /etc/vmcryptd/vmcryptd.toml
systemctl reload vmcryptd
sleep 1
journalctl -u vmcryptd --no-pager -o cat | grep -q 'running configuration kept' || fail "a broken file was not refused in the journal"
[ "$(systemctl show -p ActiveState --value vmcryptd)" = active ] || fail "a broken reload stopped the daemon"

step "vmcryptd lock / unlock"
vmcryptd lock >> "$out" 2>&1 || fail "lock"
if cat /srv/view1/vm1/vm1.nvram >/dev/null 2>/e2e/err; then fail "read after lock succeeded"; fi
grep -q "Permission denied" /e2e/err || fail "read after lock: $(cat /e2e/err), want EACCES"
vmcryptd status --json | grep -q '"cached_keys": *0' || fail "cached_keys not 0 after lock"
vmcryptd unlock >> "$out" 2>&1 || fail "unlock"
cmp -n 1048576 /e2e/pattern /srv/view1/vm1/vm1-flat.vmdk || fail "read after unlock"

step "systemctl restart: keys fetched again, views back"
base_cfg > /etc/vmcryptd/vmcryptd.toml
systemctl restart vmcryptd || fail "restart"
grep -q " /srv/view1 fuse" /proc/mounts || fail "view not back after restart"
for i in $(seq 100); do cmp -s -n 1048576 /e2e/pattern /srv/view1/vm1/vm1-flat.vmdk && break; sleep 0.1; done
cmp -n 1048576 /e2e/pattern /srv/view1/vm1/vm1-flat.vmdk || fail "data after restart"

step "systemd-analyze security"
systemd-analyze security vmcryptd --no-pager > /e2e/security.txt 2>&1 || true
tail -1 /e2e/security.txt >> "$out"

step "systemctl stop: views unmounted, process gone"
systemctl stop vmcryptd || fail "stop"
views=$(awk '$3 == "fuse" || $3 ~ /^fuse\./' /proc/mounts)
[ -n "$views" ] && fail "a view is still mounted after stop: $views"
kill -0 "$pid" 2>/dev/null && fail "daemon process still alive after stop"
journalctl -u vmcryptd --no-pager -o cat | grep -q 'keys zeroed' || fail "no 'keys zeroed' at stop"
log "E2E PASS"
systemctl poweroff
