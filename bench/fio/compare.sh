#!/usr/bin/env bash
# Compares the vmcryptd FUSE view (fusefs) with gocryptfs, in the same run,
# on tmpfs, with the same fio jobs; prints medians and ours/gocryptfs.
#
#   sudo bench/fio/compare.sh              # full run (1 GiB file, 3 repeats)
#   sudo SIZE=256M REPEATS=1 bench/fio/compare.sh
#   sudo bench/fio/compare.sh rss          # daemon RSS while streaming 8 GiB
#
# Environment:
#   SIZE=1G        file size for every job
#   REPEATS=3      repeats per job (medians are reported)
#   RUNTIME=8      seconds for each 4 KiB random job
#   FS_LIST="ours gocryptfs"   which file systems to measure
#   MODES="0 1"    buffered (0) and O_DIRECT (1)
#   JOBS="seqwrite seqread randread randwrite"
#   FUSEBENCH_FLAGS="..."      extra flags for our daemon (tuning)
#   STREAM_SIZE=8G file size for the rss mode
#   OUT=dir        keep fio's JSON output there
#
# Needs root (mount, drop_caches), go, fio, gocryptfs, python3.
set -euo pipefail

MODE=${1:-compare}
SIZE=${SIZE:-1G}
REPEATS=${REPEATS:-3}
RUNTIME=${RUNTIME:-8}
FS_LIST=${FS_LIST:-"ours gocryptfs"}
MODES=${MODES:-"0 1"}
JOBS=${JOBS:-"seqwrite seqread randread randwrite"}
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

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
WORK=$(mktemp -d /tmp/vmcryptd-fio.XXXXXX)
OUT=${OUT:-$WORK/results}
BIN=$WORK/fusebench
OURS_PID=

cleanup() {
	set +e
	if [ -n "$OURS_PID" ]; then
		kill -TERM "$OURS_PID" 2>/dev/null
		wait "$OURS_PID" 2>/dev/null
	fi
	mountpoint -q "$WORK/tmp/gc-mnt" && fusermount -u "$WORK/tmp/gc-mnt"
	mountpoint -q "$WORK/tmp/ours-mnt" && umount -l "$WORK/tmp/ours-mnt"
	# gocryptfs exits a moment after its unmount; the tmpfs is busy until.
	for _ in $(seq 50); do
		mountpoint -q "$WORK/tmp" || break
		umount "$WORK/tmp" 2>/dev/null && break
		sleep 0.1
	done
	if [ "$OUT" = "$WORK/results" ]; then rm -rf "$WORK"; else rm -rf "$WORK/tmp" "$BIN"; fi
}
trap cleanup EXIT

(cd "$REPO" && go build -o "$BIN" ./bench/fio/cmd/fusebench)
mkdir -p "$WORK/tmp" "$OUT"
# Both file systems store their ciphertext on the same tmpfs, so neither
# pays for a disk and the comparison is the FUSE path plus the crypto.
mount -t tmpfs -o size=20g,mode=0755 tmpfs "$WORK/tmp"
mkdir -p "$WORK/tmp/ours-store" "$WORK/tmp/ours-mnt" "$WORK/tmp/gc-cipher" "$WORK/tmp/gc-mnt"

start_ours() {
	# shellcheck disable=SC2086
	"$BIN" -store "$WORK/tmp/ours-store" -mnt "$WORK/tmp/ours-mnt" -pidfile "$WORK/ours.pid" $FUSEBENCH_FLAGS \
		2>"$WORK/ours.log" &
	OURS_PID=$!
	for _ in $(seq 100); do
		mountpoint -q "$WORK/tmp/ours-mnt" && [ -s "$WORK/ours.pid" ] && return 0
		sleep 0.1
	done
	echo "compare.sh: our mount did not come up:" >&2
	cat "$WORK/ours.log" >&2
	exit 1
}

start_gocryptfs() {
	gocryptfs -q -init -extpass 'echo pw' "$WORK/tmp/gc-cipher" >/dev/null
	gocryptfs -q -extpass 'echo pw' "$WORK/tmp/gc-cipher" "$WORK/tmp/gc-mnt"
}

mnt_of() {
	case $1 in
	ours) echo "$WORK/tmp/ours-mnt" ;;
	gocryptfs) echo "$WORK/tmp/gc-mnt" ;;
	esac
}

drop_caches() {
	sync
	echo 3 >/proc/sys/vm/drop_caches
}

# run_job FS JOB DIRECT REPEAT
run_job() {
	local fs=$1 job=$2 direct=$3 rep=$4
	local file
	file="$(mnt_of "$fs")/fio.bin"
	local common=(--name="$job" --filename="$file" --size="$SIZE" --ioengine=psync --numjobs=1
		--direct="$direct" --output-format=json --output="$OUT/$fs-$job-d$direct-r$rep.json")
	case $job in
	seqwrite)
		rm -f "$file"
		fio "${common[@]}" --rw=write --bs=1M --end_fsync=1 ;;
	seqread)
		drop_caches
		fio "${common[@]}" --rw=read --bs=1M ;;
	randread)
		drop_caches
		fio "${common[@]}" --rw=randread --bs=4k --runtime="$RUNTIME" --time_based ;;
	randwrite)
		# end_fsync: the data must have reached the file system, not
		# just a page cache, for the figure to count.
		fio "${common[@]}" --rw=randwrite --bs=4k --runtime="$RUNTIME" --time_based --end_fsync=1 ;;
	esac
}

summarise() {
	python3 - "$OUT" "$FS_LIST" "$MODES" "$JOBS" <<'EOF'
import json, os, statistics, sys
out, fs_list, modes, jobs = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), sys.argv[4].split()
res = {}
for name in os.listdir(out):
    if not name.endswith(".json"):
        continue
    fs, job, d, _ = name[:-5].split("-")
    with open(os.path.join(out, name)) as f:
        txt = f.read()
    j = json.loads(txt[txt.index("{"):])  # fio may print notes first
    jb = j["jobs"][0]
    side = jb["write"] if "write" in job else jb["read"]
    val = side["bw_bytes"] / 1e6 if job.startswith("seq") else side["iops"]
    res.setdefault((fs, job, d), []).append(val)
unit = {"seqwrite": "MB/s", "seqread": "MB/s", "randread": "IOPS", "randwrite": "IOPS"}
label = {"seqwrite": "seq write 1M", "seqread": "seq read 1M", "randread": "rand read 4k", "randwrite": "rand write 4k"}
target = {"seqwrite": 2.0, "randwrite": 2.0, "seqread": 1.5, "randread": 1.5}
hdr = f"{'job':<16}{'mode':<9}" + "".join(f"{fs:>22}" for fs in fs_list)
if len(fs_list) == 2:
    hdr += f"{'ours/gc':>10}{'target':>8}"
print(hdr)
for d in modes:
    for job in jobs:
        row = f"{label[job]:<16}{('O_DIRECT' if d == '1' else 'buffered'):<9}"
        med = {}
        for fs in fs_list:
            v = res.get((fs, job, "d" + d), [])
            if v:
                med[fs] = statistics.median(v)
                spread = f"({min(v):.0f}-{max(v):.0f})" if len(v) > 1 else ""
                cell = f"{med[fs]:.0f} {unit[job]} {spread}"
            else:
                cell = "-"
            row += f"{cell:>22}"
        if len(fs_list) == 2 and all(fs in med for fs in fs_list) and med[fs_list[1]] > 0:
            r = med[fs_list[0]] / med[fs_list[1]]
            ok = "ok" if r >= target[job] else "MISS"
            row += f"{r:>9.2f}x{target[job]:>6.1f}x {ok}"
        print(row)
print(f"(medians of repeats, range in parentheses; files of {os.environ.get('SIZE', '1G')} on tmpfs, fio psync, 1 job)")
EOF
}

stream_rss() {
	local mnt pid peak
	mnt=$(mnt_of ours)
	pid=$(cat "$WORK/ours.pid")
	echo "streaming $STREAM_SIZE through the view (write with fsync, then read), pid $pid"
	local t0 t1
	t0=$(date +%s.%N)
	fio --name=stream-write --filename="$mnt/stream.bin" --size="$STREAM_SIZE" --rw=write --bs=1M \
		--ioengine=psync --end_fsync=1 --output-format=json --output="$WORK/stream-w.json"
	drop_caches
	fio --name=stream-read --filename="$mnt/stream.bin" --size="$STREAM_SIZE" --rw=read --bs=1M \
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
	rm -f "$mnt/stream.bin"
}

[[ " $FS_LIST " == *" ours "* || $MODE == rss ]] && start_ours
[[ " $FS_LIST " == *" gocryptfs "* && $MODE != rss ]] && start_gocryptfs

if [ "$MODE" = rss ]; then
	stream_rss
	exit 0
fi

for rep in $(seq "$REPEATS"); do
	for direct in $MODES; do
		for job in $JOBS; do
			# Alternate the order so neither file system always runs on
			# the warmer (or more contended) slot.
			order=$FS_LIST
			if [ $((rep % 2)) -eq 0 ]; then order=$(echo "$FS_LIST" | tr ' ' '\n' | tac | tr '\n' ' '); fi
			for fs in $order; do
				run_job "$fs" "$job" "$direct" "$rep"
				rss=""
				if [ "$fs" = ours ]; then
					rss=" (daemon RSS $(($(awk '/VmRSS/ {print $2}' "/proc/$OURS_PID/status") / 1024)) MiB, peak $(($(awk '/VmHWM/ {print $2}' "/proc/$OURS_PID/status") / 1024)) MiB)"
				fi
				echo "repeat $rep: $fs $job direct=$direct done$rss" >&2
			done
		done
	done
done
summarise
if [ -n "$OURS_PID" ]; then
	echo "our daemon's peak RSS (VmHWM): $(($(awk '/VmHWM/ {print $2}' "/proc/$OURS_PID/status") / 1024)) MiB"
fi
