#!/usr/bin/env bash
# Runs every fuzz target in the module for the given time each (default 3m).
# Opt-in (`make fuzz`): far too long for `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
fuzztime="${1:-3m}"
for pkg in $(go list ./...); do
	dir=$(go list -f '{{.Dir}}' "$pkg")
	for name in $(grep -ho '^func Fuzz[A-Za-z0-9_]*' "$dir"/*_test.go 2>/dev/null | sed 's/^func //'); do
		echo "== $pkg $name ($fuzztime)"
		go test -run='^$' -fuzz="^${name}\$" -fuzztime="$fuzztime" "$pkg"
	done
done
