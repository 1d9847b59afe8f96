#!/usr/bin/env bash
# Compares the vmcryptd FUSE view with gocryptfs and with go-fuse serving
# the same files unencrypted, in the same run, on tmpfs, with the same fio
# jobs; prints medians and the ratios ours/gocryptfs and ours/plain.
#
#   sudo bench/fio/compare.sh              # full run (1 GiB, 3 repeats)
#   sudo SIZE=256M REPEATS=1 bench/fio/compare.sh
#   sudo MODES=1 JOBS="randread-qd32 randwrite-qd32" bench/fio/compare.sh
#   sudo TARGET=fixture bench/fio/compare.sh   # cmd/fusebench instead of the product
#   sudo bench/fio/compare.sh rss          # daemon RSS while streaming 8 GiB
#
# TARGET=product (the default) measures what users run: `vmcryptd lab up`
# (embedded lab KMS + daemon), `vmcryptd vm create --encrypt` with one
# monolithicFlat disk of SIZE, `vmcryptd mount` of the lab datastore, and
# fio on the disk's flat extent through the view. TARGET=fixture mounts
# cmd/fusebench instead (every file a container under one random DEK),
# whose flags expose the tuning knobs (FUSEBENCH_FLAGS).
#
# Environment:
#   SIZE=1G        file size for every job
#   REPEATS=3      repeats per job (medians are reported)
#   RUNTIME=8      seconds for each 4 KiB random job
#   FS_LIST="ours gocryptfs plain"   which file systems to measure
#                  (ours: TARGET; plain: cmd/fusebench -plain, go-fuse
#                  serving plain files, the transport's own limit)
#   MODES="0 1"    buffered (0) and O_DIRECT (1)
#   JOBS="seqwrite seqread randread randwrite randread-qd32 randwrite-qd32 randread-4j randrw-4j"
#   FUSEBENCH_FLAGS="..."      extra flags for cmd/fusebench (fixture and plain)
#   STREAM_SIZE=8G file size for the rss mode
#   OUT=dir        keep fio's JSON output there
#
# Needs root (mount, drop_caches), go, fio, gocryptfs, python3.
set -euo pipefail

MODE=${1:-compare}
TARGET=${TARGET:-product}
SIZE=${SIZE:-1G}
REPEATS=${REPEATS:-3}
RUNTIME=${RUNTIME:-8}
FS_LIST=${FS_LIST:-"ours gocryptfs plain"}
MODES=${MODES:-"0 1"}
JOBS=${JOBS:-"seqwrite seqread randread randwrite randread-qd32 randwrite-qd32 randread-4j randrw-4j"}
FUSEBENCH_FLAGS=${FUSEBENCH_FLAGS:-}
STREAM_SIZE=${STREAM_SIZE:-8G}

if [ "$(id -u)" -ne 0 ]; then
	echo "compare.sh: run as root (it mounts tmpfs and FUSE, and drops caches)" >&2
	exit 1
fi
for tool in go fio python3 mountpoint; do
	command -v "$tool" >/dev/null || { echo "compare.sh: $tool is missing" >&2; exit 1; }
done
if [[ " $FS_LIST " == *" gocryptfs "* ]] && ! command -v gocryptfs >/dev/null; then
	echo "compare.sh: gocryptfs is missing (apt-get install gocryptfs)" >&2
	exit 1
fi
case $TARGET in
product | fixture) ;;
*) echo "compare.sh: TARGET is product or fixture, not $TARGET" >&2; exit 1 ;;
esac
if [ "$MODE" = rss ]; then FS_LIST=ours; fi

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
WORK=$(mktemp -d /tmp/vmcryptd-fio.XXXXXX)
OUT=${OUT:-$WORK/results}
FUSEBENCH=$WORK/fusebench
VMCRYPTD=$WORK/vmcryptd
LAB=$WORK/tmp/lab
declare -A PIDS=()

cleanup() {
	set +e
	for fs in "${!PIDS[@]}"; do
		kill -TERM "${PIDS[$fs]}" 2>/dev/null
		wait "${PIDS[$fs]}" 2>/dev/null
	done
	if [ -S "$LAB/vmcryptd.sock" ]; then
		"$VMCRYPTD" --socket "$LAB/vmcryptd.sock" unmount --force "$WORK/tmp/ours-mnt" >/dev/null 2>&1
		"$VMCRYPTD" lab down --dir "$LAB" >/dev/null 2>&1
	fi
	mountpoint -q "$WORK/tmp/gocryptfs-mnt" && fusermount -u "$WORK/tmp/gocryptfs-mnt"
	for fs in ours plain; do
		mountpoint -q "$WORK/tmp/$fs-mnt" && umount -l "$WORK/tmp/$fs-mnt"
	done
	# gocryptfs exits a moment after its unmount; the tmpfs is busy until.
	for _ in $(seq 50); do
		mountpoint -q "$WORK/tmp" || break
		umount "$WORK/tmp" 2>/dev/null && break
		sleep 0.1
	done
	if [ "$OUT" = "$WORK/results" ]; then rm -rf "$WORK"; else rm -rf "$WORK/tmp" "$FUSEBENCH" "$VMCRYPTD"; fi
}
trap cleanup EXIT

(cd "$REPO" && go build -o "$FUSEBENCH" ./bench/fio/cmd/fusebench && go build -o "$VMCRYPTD" ./cmd/vmcryptd)
mkdir -p "$WORK/tmp" "$OUT"
# Every file system stores its data on the same tmpfs, so none pays for
# a disk and the comparison is the FUSE path plus the crypto.
mount -t tmpfs -o size=20g,mode=0755 tmpfs "$WORK/tmp"
for fs in ours gocryptfs plain; do mkdir -p "$WORK/tmp/$fs-store" "$WORK/tmp/$fs-mnt"; done

wait_mounted() { # NAME MOUNTPOINT LOG
	for _ in $(seq 100); do
		mountpoint -q "$2" && return 0
		sleep 0.1
	done
	echo "compare.sh: the $1 mount did not come up:" >&2
	cat "$3" >&2
	exit 1
}

start_fusebench() { # NAME EXTRA-FLAGS...
	local name=$1
	shift
	# shellcheck disable=SC2086
	"$FUSEBENCH" -store "$WORK/tmp/$name-store" -mnt "$WORK/tmp/$name-mnt" "$@" $FUSEBENCH_FLAGS \
		2>"$WORK/$name.log" &
	PIDS[$name]=$!
	wait_mounted "$name" "$WORK/tmp/$name-mnt" "$WORK/$name.log"
}

# The product: a lab daemon and KMS, an encrypted VM with one flat disk of
# SIZE, the datastore's view.
start_product() {
	"$VMCRYPTD" lab up --dir "$LAB" >"$WORK/lab.log" 2>&1 || { cat "$WORK/lab.log" >&2; exit 1; }
	local sock=$LAB/vmcryptd.sock
	"$VMCRYPTD" --socket "$sock" vm create "$LAB/datastore/bvm" --name bvm --disk "$SIZE:monolithicFlat" --encrypt >/dev/null
	"$VMCRYPTD" --socket "$sock" mount lab "$WORK/tmp/ours-mnt" >/dev/null
	# The daemon is stopped by lab down (cleanup), not by a signal from here.
	DAEMON_PID=$(cat "$LAB/daemon.pid")
}

start_gocryptfs() {
	gocryptfs -q -init -extpass 'echo pw' "$WORK/tmp/gocryptfs-store" >/dev/null
	gocryptfs -q -extpass 'echo pw' "$WORK/tmp/gocryptfs-store" "$WORK/tmp/gocryptfs-mnt"
}

file_of() {
	if [ "$1" = ours ] && [ "$TARGET" = product ]; then
		echo "$WORK/tmp/ours-mnt/bvm/bvm-flat.vmdk"
	else
		echo "$WORK/tmp/$1-mnt/fio.bin"
	fi
}

drop_caches() {
	sync
	echo 3 >/proc/sys/vm/drop_caches
}

# Every file is written in full once before the jobs, so reads decrypt
# real ciphertext (a never-written unit is a hole, which reads as zeros
# without decryption) and every write job overwrites, as a guest does.
prefill() {
	fio --name=prefill --filename="$(file_of "$1")" --size="$SIZE" --rw=write --bs=1M --ioengine=psync \
		--end_fsync=1 --output-format=json --output="$WORK/prefill-$1.json" >/dev/null
}

# run_job FS JOB DIRECT REPEAT
run_job() {
	local fs=$1 job=$2 direct=$3 rep=$4
	local common=(--name="$job" --filename="$(file_of "$fs")" --size="$SIZE" --ioengine=psync --numjobs=1
		--direct="$direct" --group_reporting --output-format=json --output="$OUT/${fs}_${job}_d${direct}_r$rep.json")
	local rnd=(--bs=4k --runtime="$RUNTIME" --time_based)
	case $job in
	seqwrite) fio "${common[@]}" --rw=write --bs=1M --end_fsync=1 ;;
	seqread)
		drop_caches
		fio "${common[@]}" --rw=read --bs=1M ;;
	randread)
		drop_caches
		fio "${common[@]}" --rw=randread "${rnd[@]}" ;;
	# end_fsync: the data must have reached the file system, not just a
	# page cache, for the figure to count.
	randwrite) fio "${common[@]}" --rw=randwrite "${rnd[@]}" --end_fsync=1 ;;
	randread-qd32)
		drop_caches
		fio "${common[@]}" --rw=randread "${rnd[@]}" --ioengine=libaio --iodepth=32 ;;
	randwrite-qd32) fio "${common[@]}" --rw=randwrite "${rnd[@]}" --ioengine=libaio --iodepth=32 --end_fsync=1 ;;
	randread-4j)
		drop_caches
		fio "${common[@]}" --rw=randread "${rnd[@]}" --numjobs=4 ;;
	randrw-4j)
		drop_caches
		fio "${common[@]}" --rw=randrw --rwmixread=70 "${rnd[@]}" --numjobs=4 --end_fsync=1 ;;
	*)
		echo "compare.sh: unknown job $job" >&2
		exit 1 ;;
	esac
}

summarise() {
	python3 - "$OUT" "$FS_LIST" "$MODES" "$JOBS" "$TARGET" <<'EOF'
import json, os, statistics, sys
out, fs_list, modes, jobs, target_name = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), sys.argv[4].split(), sys.argv[5]
res = {}
for name in os.listdir(out):
    if not name.endswith(".json"):
        continue
    fs, job, d, _ = name[:-5].split("_")
    with open(os.path.join(out, name)) as f:
        txt = f.read()
    j = json.loads(txt[txt.index("{"):])  # fio may print notes first
    jb = j["jobs"][0]
    if job.startswith("seq"):
        side = jb["write"] if "write" in job else jb["read"]
        val = side["bw_bytes"] / 1e6
    else:
        val = jb["read"]["iops"] + jb["write"]["iops"]
    res.setdefault((fs, job, d), []).append(val)
label = {"seqwrite": "seq write 1M", "seqread": "seq read 1M", "randread": "rand read 4k",
         "randwrite": "rand write 4k", "randread-qd32": "rand read qd32", "randwrite-qd32": "rand write qd32",
         "randread-4j": "rand read 4 jobs", "randrw-4j": "rand 70/30 4 jobs"}
# Targets (issue 14 and earlier): ours/gocryptfs by (job, O_DIRECT?), and
# ours/plain.
gc_target = {("seqwrite", "0"): 2.0, ("seqwrite", "1"): 2.0, ("seqread", "0"): 1.5, ("seqread", "1"): 1.5,
             ("randwrite", "0"): 2.0, ("randwrite", "1"): 2.0,
             ("randread-qd32", "1"): 3.0, ("randwrite-qd32", "1"): 5.0,
             ("randread-4j", "0"): 2.5, ("randread-4j", "1"): 2.5, ("randrw-4j", "0"): 6.0, ("randrw-4j", "1"): 6.0}
plain_target = {("randread", "0"): 0.95, ("randread", "1"): 0.95}
have_gc, have_plain = "gocryptfs" in fs_list and "ours" in fs_list, "plain" in fs_list and "ours" in fs_list
hdr = f"{'job':<19}{'mode':<9}" + "".join(f"{fs:>22}" for fs in fs_list)
if have_gc:
    hdr += f"{'ours/gc':>9}{'target':>12}"
if have_plain:
    hdr += f"{'ours/plain':>11}{'target':>12}"
print(hdr)
for d in modes:
    for job in jobs:
        row = f"{label[job]:<19}{('O_DIRECT' if d == '1' else 'buffered'):<9}"
        med = {}
        for fs in fs_list:
            v = res.get((fs, job, "d" + d), [])
            if v:
                med[fs] = statistics.median(v)
                spread = f"({min(v):.0f}-{max(v):.0f})" if len(v) > 1 else ""
                cell = f"{med[fs]:.0f} {spread}"
            else:
                cell = "-"
            row += f"{cell:>22}"
        for have, other, targets in ((have_gc, "gocryptfs", gc_target), (have_plain, "plain", plain_target)):
            if not have:
                continue
            if "ours" in med and med.get(other, 0) > 0:
                r = med["ours"] / med[other]
                t = targets.get((job, d))
                row += f"{r:>8.2f}x" + (f"{t:>6.2f}x {'ok' if r >= t else 'MISS'}" if t else " " * 12)
            else:
                row += f"{'-':>9}" + " " * 12
        print(row)
print(f"(medians of {os.environ.get('REPEATS', '3')} alternating rounds, range in parentheses; MB/s for seq, IOPS (read+write) otherwise;")
print(f" {os.environ.get('SIZE', '1G')} files on tmpfs; ours = {target_name}; psync 1 job unless named; qd32 = libaio iodepth 32)")
EOF
}

stream_rss() {
	local file pid peak
	file=$(file_of ours)
	pid=$1
	echo "streaming $STREAM_SIZE through the view (write with fsync, then read), pid $pid"
	local t0 t1
	t0=$(date +%s.%N)
	fio --name=stream-write --filename="$file" --size="$STREAM_SIZE" --rw=write --bs=1M \
		--ioengine=psync --end_fsync=1 --output-format=json --output="$WORK/stream-w.json"
	drop_caches
	fio --name=stream-read --filename="$file" --size="$STREAM_SIZE" --rw=read --bs=1M \
		--ioengine=psync --output-format=json --output="$WORK/stream-r.json"
	t1=$(date +%s.%N)
	peak=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
	echo "daemon peak RSS (VmHWM): $((peak / 1024)) MiB over $(python3 -c "print(round($t1-$t0,1))") s"
	python3 - "$WORK/stream-w.json" "$WORK/stream-r.json" <<'EOF'
import json, sys
for p in sys.argv[1:]:
    t = open(p).read(); j = json.loads(t[t.index("{"):])["jobs"][0]
    side = j["write"] if j["write"]["io_bytes"] else j["read"]
    print(f"  {j['jobname']}: {side['bw_bytes']/1e6:.0f} MB/s")
EOF
}

DAEMON_PID=
for fs in $FS_LIST; do
	case $fs in
	ours)
		if [ "$TARGET" = product ]; then
			[ "$MODE" = rss ] && SIZE=$STREAM_SIZE
			start_product
		else
			start_fusebench ours
			DAEMON_PID=${PIDS[ours]}
		fi ;;
	plain) start_fusebench plain -plain ;;
	gocryptfs) start_gocryptfs ;;
	*) echo "compare.sh: unknown file system $fs" >&2; exit 1 ;;
	esac
done

if [ "$MODE" = rss ]; then
	stream_rss "$DAEMON_PID"
	exit 0
fi

for fs in $FS_LIST; do prefill "$fs"; done
read -r -a fss <<<"$FS_LIST"
echo "load before the run: $(uptime)" >&2
for rep in $(seq "$REPEATS"); do
	for direct in $MODES; do
		for job in $JOBS; do
			# Rotate the order so no file system always runs on the
			# warmer (or more contended) slot.
			order=()
			for i in "${!fss[@]}"; do order+=("${fss[$(((i + rep) % ${#fss[@]}))]}"); done
			for fs in "${order[@]}"; do
				run_job "$fs" "$job" "$direct" "$rep"
				rss=""
				if [ "$fs" = ours ] && [ -n "$DAEMON_PID" ]; then
					rss=" (daemon RSS $(($(awk '/VmRSS/ {print $2}' "/proc/$DAEMON_PID/status") / 1024)) MiB)"
				fi
				echo "repeat $rep: $fs $job direct=$direct done$rss" >&2
			done
		done
	done
done
summarise
echo "load after the run: $(uptime)"
if [ -n "$DAEMON_PID" ]; then
	echo "our daemon's peak RSS (VmHWM): $(($(awk '/VmHWM/ {print $2}' "/proc/$DAEMON_PID/status") / 1024)) MiB"
fi
