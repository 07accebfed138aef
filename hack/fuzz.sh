#!/usr/bin/env bash
# Runs every native Go fuzz target of the module for a bounded time each
# (FUZZTIME, default 10s): the parsers of images, annotations, the CRI log
# writer and the Unikraft command line. Seeds and past findings under
# testdata/fuzz run as ordinary tests in `make test-unit` too.
set -euo pipefail
cd "$(dirname "$0")/.."
FUZZTIME=${FUZZTIME:-10s}
GO=${GO:-go}
status=0
while IFS=: read -r file fn; do
	pkg=./$(dirname "$file")
	echo ">> $fn ($pkg, $FUZZTIME)"
	if ! $GO test -run '^$' -fuzz "^${fn}\$" -fuzztime "$FUZZTIME" -fuzzminimizetime 5s "$pkg"; then
		status=1
	fi
done < <(grep -rHoE --include='*_test.go' '^func Fuzz[A-Za-z0-9_]+' --exclude-dir=_output . | sed -E 's#^\./##; s#:func #:#' | sort)
exit $status
