#!/usr/bin/env bash
# NBD export benchmark: the same fio jobs (ioengine=nbd, iodepth 32) on
#   ours     vmcryptd's NBD export of an encrypted 1 GiB flat disk (a lab daemon)
#   qemu-nbd qemu-nbd serving a LUKS image of the same size
#   nbdkit   nbdkit's luks filter over the same LUKS image (if installed)
# and, with fio's libaio engine (O_DIRECT, iodepth 32), on
#   view     the same encrypted disk through vmcryptd's FUSE view
# Rounds alternate the order of the targets; medians and ratios at the end.
#
#   sudo bench/nbd/compare.sh                 # REPEATS=3 RUNTIME=10 SIZE=1G
#   sudo REPEATS=5 TARGETS="ours qemu-nbd" JOBS="randread randwrite" bench/nbd/compare.sh
#   sudo bench/nbd/compare.sh rss             # daemon peak RSS while copying STREAM_SIZE (8G) through the export
#
# Needs root, fio, qemu-utils, libnbd-bin (nbdcopy for rss), optionally nbdkit.
set -euo pipefail
cd "$(dirname "$0")/../.."
mode="${1:-compare}"
REPEATS="${REPEATS:-3}"
RUNTIME="${RUNTIME:-10}"
SIZE="${SIZE:-1G}"
STREAM_SIZE="${STREAM_SIZE:-8G}"
JOBS="${JOBS:-randread randwrite seqread seqwrite}"
TARGETS="${TARGETS:-ours qemu-nbd nbdkit view}"
# tmpfs for the comparison; the real disk for rss (STREAM_SIZE of
# ciphertext must fit).
if [ "$mode" = rss ]; then
	WORK="${WORK:-$(mktemp -d /var/tmp/nbdbench.XXXXXX)}"
else
	WORK="${WORK:-$(mktemp -d /dev/shm/nbdbench.XXXXXX)}"
fi
PASS=nbdbench-passphrase

[ "$(id -u)" -eq 0 ] || { echo "compare.sh: needs root (daemon, FUSE view)" >&2; exit 1; }
for c in fio qemu-img qemu-nbd python3; do
	command -v "$c" >/dev/null || { echo "compare.sh: $c missing (scripts/install-deps.sh)" >&2; exit 1; }
done
if ! command -v nbdkit >/dev/null || [ ! -e "$(nbdkit --dump-config | sed -n 's/^filterdir=//p')/nbdkit-luks-filter.so" ]; then
	TARGETS="${TARGETS//nbdkit/}"
fi

go build -o "$WORK/vmcryptd" ./cmd/vmcryptd
V="$WORK/vmcryptd"
pids=()
cleanup() {
	set +e
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
	wait 2>/dev/null
	"$V" --socket "$WORK/lab/vmcryptd.sock" unmount --force "$WORK/view" >/dev/null 2>&1
	"$V" lab down --dir "$WORK/lab" >/dev/null 2>&1
	rm -rf "$WORK"
}
trap cleanup EXIT

"$V" lab up --dir "$WORK/lab" >/dev/null
export VMCRYPTD_SOCKET="$WORK/lab/vmcryptd.sock"
ds="$WORK/lab/datastore"

if [ "$mode" = rss ]; then
	command -v nbdcopy >/dev/null || { echo "compare.sh rss: nbdcopy missing (libnbd-bin)" >&2; exit 1; }
	"$V" vm create "$ds/rss" --name rss --disk "$STREAM_SIZE" --encrypt >/dev/null
	disk=$(ls "$ds"/rss/*.vmdk | grep -v -- -flat | head -1)
	"$V" export start "$disk" --unix "$WORK/rss.sock" >/dev/null
	pid=$(cat "$WORK/lab/daemon.pid")
	rss0=$(awk '/VmRSS/{print $2}' /proc/$pid/status)
	# Sample the daemon's RSS every 0.2 s during the copies.
	( peak=0; while kill -0 "$pid" 2>/dev/null && [ ! -e "$WORK/rss.done" ]; do
		r=$(awk '/VmRSS/{print $2}' /proc/$pid/status); [ "$r" -gt "$peak" ] && peak=$r
		echo "$peak" >"$WORK/rss.peak"; sleep 0.2; done ) &
	sampler=$!
	pids+=("$sampler")
	t0=$(date +%s.%N)
	# Debian's nbdcopy has no pattern: source; nbdkit's pattern plugin
	# (or fio when nbdkit is missing) writes non-zero data.
	if command -v nbdkit >/dev/null; then
		nbdcopy -- [ nbdkit --exit-with-parent pattern size="$STREAM_SIZE" ] "nbd+unix:///?socket=$WORK/rss.sock"
	else
		fio --name=w --ioengine=nbd --uri="nbd+unix:///?socket=$WORK/rss.sock" --rw=write --bs=1M --iodepth=32 --size="$STREAM_SIZE" --output-format=terse >/dev/null
	fi
	t1=$(date +%s.%N)
	nbdcopy "nbd+unix:///?socket=$WORK/rss.sock" null:
	t2=$(date +%s.%N)
	touch "$WORK/rss.done"; wait "$sampler"
	hwm=$(awk '/VmHWM/{print $2}' /proc/$pid/status)
	echo "nbdcopy $STREAM_SIZE into the export: $(python3 -c "print(round($t1-$t0,1))") s; out of it: $(python3 -c "print(round($t2-$t1,1))") s"
	echo "daemon RSS before: $((rss0 / 1024)) MiB, sampled peak during the copies: $(($(cat "$WORK/rss.peak") / 1024)) MiB, VmHWM (daemon life): $((hwm / 1024)) MiB"
	"$V" export stop "$WORK/rss.sock" >/dev/null
	exit 0
fi

# Our disk: an encrypted VM with one flat disk, filled once.
"$V" vm create "$ds/bench" --name bench --disk "$SIZE" --encrypt >/dev/null
disk=$(ls "$ds"/bench/*.vmdk | grep -v -- -flat | head -1)
"$V" export start "$disk" --unix "$WORK/ours.sock" >/dev/null
ours="nbd+unix:///?socket=$WORK/ours.sock"
fio --name=fill --ioengine=nbd --uri="$ours" --rw=write --bs=1M --iodepth=32 --size="$SIZE" --output-format=terse >/dev/null

# The reference: a LUKS image (qemu's luks driver) of the same size, filled.
# (qemu's PBKDF benchmark fails with "Unable to get accurate CPU usage"
# on a loaded machine now and then: retried.)
for try in 1 2 3 4 5; do
	qemu-img create -q -f luks --object secret,id=s0,data=$PASS -o key-secret=s0 "$WORK/luks.img" "$SIZE" && break
	[ "$try" -lt 5 ] || exit 1
	sleep 1
done
qemu-nbd --persistent --shared=8 --socket="$WORK/qemu.sock" --object secret,id=s0,data=$PASS \
	--image-opts "driver=luks,key-secret=s0,file.driver=file,file.filename=$WORK/luks.img" &
pids+=($!)
if [[ " $TARGETS " == *" nbdkit "* ]]; then
	nbdkit --foreground --unix "$WORK/nbdkit.sock" --filter=luks file "$WORK/luks.img" passphrase=$PASS &
	pids+=($!)
fi
for i in $(seq 100); do [ -S "$WORK/qemu.sock" ] && break; sleep 0.1; done
qemu="nbd+unix:///?socket=$WORK/qemu.sock"
fio --name=fill --ioengine=nbd --uri="$qemu" --rw=write --bs=1M --iodepth=32 --size="$SIZE" --output-format=terse >/dev/null
if [[ " $TARGETS " == *" nbdkit "* ]]; then
	for i in $(seq 100); do [ -S "$WORK/nbdkit.sock" ] && break; sleep 0.1; done
fi

if [[ " $TARGETS " == *" view "* ]]; then
	"$V" mount lab "$WORK/view" >/dev/null
	viewfile="$WORK/view/bench/$(basename "${disk%.vmdk}")-flat.vmdk"
fi

job_args() { # job -> fio arguments
	case "$1" in
	randread) echo "--rw=randread --bs=4k" ;;
	randwrite) echo "--rw=randwrite --bs=4k" ;;
	seqread) echo "--rw=read --bs=1M" ;;
	seqwrite) echo "--rw=write --bs=1M" ;;
	esac
}

run_fio() { # target job -> IOPS (4k) or MB/s (1M)
	local target=$1 job=$2 eng
	case "$target" in
	ours) eng="--ioengine=nbd --uri=$ours" ;;
	qemu-nbd) eng="--ioengine=nbd --uri=$qemu" ;;
	nbdkit) eng="--ioengine=nbd --uri=nbd+unix:///?socket=$WORK/nbdkit.sock" ;;
	view) eng="--ioengine=libaio --direct=1 --filename=$viewfile" ;;
	esac
	# shellcheck disable=SC2046
	fio --name="$job" $eng $(job_args "$job") --iodepth=32 --size="$SIZE" --time_based --runtime="$RUNTIME" \
		--ramp_time=1 --output-format=json 2>/dev/null | python3 -c '
import json, sys
t = sys.stdin.read()  # the nbd engine prints a line before the JSON
j = json.loads(t[t.index("{"):])["jobs"][0]
op = "read" if j["job options"]["rw"] in ("read", "randread") else "write"
r = j[op]
print(round(r["iops"]) if sys.argv[1].startswith("rand") else round(r["bw_bytes"] / 1e6))
' "$job"
}

declare -A res
echo "load before: $(uptime)" >&2
targets=($TARGETS)
for round in $(seq "$REPEATS"); do
	order=("${targets[@]}")
	if (( round % 2 == 0 )); then
		order=(); for (( i=${#targets[@]}-1; i>=0; i-- )); do order+=("${targets[i]}"); done
	fi
	for job in $JOBS; do
		for t in "${order[@]}"; do
			v=$(run_fio "$t" "$job")
			res[$t,$job]+="$v "
			echo "round $round $job $t: $v" >&2
		done
	done
done
echo "load after: $(uptime)" >&2
pid=$(cat "$WORK/lab/daemon.pid")
echo "daemon peak RSS (VmHWM): $(( $(awk '/VmHWM/{print $2}' /proc/$pid/status) / 1024 )) MiB" >&2

python3 - "$REPEATS" "$TARGETS" "$JOBS" "$(for k in "${!res[@]}"; do echo "$k=${res[$k]}"; done)" <<'EOF'
import statistics, sys
reps, targets, jobs, raw = int(sys.argv[1]), sys.argv[2].split(), sys.argv[3].split(), sys.argv[4]
res = {}
for line in raw.strip().splitlines():
    k, v = line.split("=", 1)
    res[tuple(k.split(","))] = [int(x) for x in v.split()]
unit = {"randread": "IOPS", "randwrite": "IOPS", "seqread": "MB/s", "seqwrite": "MB/s"}
name = {"randread": "4 KiB rand read QD32", "randwrite": "4 KiB rand write QD32", "seqread": "1 MiB seq read QD32", "seqwrite": "1 MiB seq write QD32"}
refs = [t for t in targets if t != "ours"]
print("| job | " + " | ".join(targets) + " | " + " | ".join("ours/" + r for r in refs) + " |")
print("|---" * (1 + len(targets) + len(refs)) + "|")
for j in jobs:
    med = {t: statistics.median(res[(t, j)]) for t in targets}
    cells = ["%d %s (%d-%d)" % (med[t], unit[j], min(res[(t, j)]), max(res[(t, j)])) for t in targets]
    ratios = ["%.2fx" % (med["ours"] / med[r]) if med[r] else "-" for r in refs] if "ours" in targets else []
    print("| " + name[j] + " | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
EOF
