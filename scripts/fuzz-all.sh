#!/usr/bin/env bash
# Runs every fuzz target in the module for the given time each (default 3m).
# Opt-in (`make fuzz`): far too long for `make test`.
#   FUZZ_PARALLEL=N   fuzz workers per target (default: go's, GOMAXPROCS)
#   FUZZ_MEM_KIB=N    address-space limit (ulimit -v) of the memory-capped
#                     targets, FuzzInspectFile (default 8 GiB: the fuzzing
#                     engine reserves address space; an input that makes
#                     inspect grow without bound dies there, and is saved)
set -euo pipefail
cd "$(dirname "$0")/.."
fuzztime="${1:-3m}"
par=()
[ -n "${FUZZ_PARALLEL:-}" ] && par=(-parallel "$FUZZ_PARALLEL")
for pkg in $(go list ./...); do
	dir=$(go list -f '{{.Dir}}' "$pkg")
	for name in $(grep -ho '^func Fuzz[A-Za-z0-9_]*' "$dir"/*_test.go 2>/dev/null | sed 's/^func //'); do
		echo "== $pkg $name ($fuzztime)"
		case "$name" in
		FuzzInspectFile)
			# Whole-file inspect: each input must also stay within the
			# allocation and time bounds the target checks itself.
			(ulimit -v "${FUZZ_MEM_KIB:-$((8 << 20))}" && go test -run='^$' -fuzz="^${name}\$" -fuzztime="$fuzztime" "${par[@]}" "$pkg")
			;;
		*)
			go test -run='^$' -fuzz="^${name}\$" -fuzztime="$fuzztime" "${par[@]}" "$pkg"
			;;
		esac
	done
done
# Peak RSS and time of inspect on the known-bad whole files (1 GiB sparse
# files with every magic, limits reached), each in a child process,
# without -race: the measurable form of the memory bound.
# The corpus FuzzInspectFile built is replayed there too.
echo "== inspect memory and time bounds"
corpus="$(go env GOCACHE)/fuzz/$(go list ./internal/inspect/)/FuzzInspectFile"
[ -d "$corpus" ] || corpus=
VMCRYPTD_INSPECT_CORPUS="$corpus" go test -count=1 -run '^TestInspectMemoryBound$' -v ./internal/inspect/ |
	grep -E 'peak RSS|corpus|largest|^(ok|FAIL|---)'
