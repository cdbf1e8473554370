#!/usr/bin/env bash
# tools/flaky.sh N [pytest args]: run the chosen tests N times in a row and report each test's failures.
#
#   tools/flaky.sh 20 tests/e2e/test_faults.py -k sigterm
#
# Each run writes a JUnit report; the summary lists every test with its runs, failures and errors, flaky ones
# first, and the folder with each run's log. Exit 0 when no test failed in any run, 1 otherwise.
set -u
if [ $# -lt 1 ] || ! [ "$1" -ge 1 ] 2>/dev/null; then
    echo "usage: tools/flaky.sh N [pytest args]" >&2
    exit 2
fi
runs=$1
shift
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
out=$(mktemp -d "${TMPDIR:-/tmp}/flaky.XXXXXX")
for i in $(seq 1 "$runs"); do
    started=$(date +%s)
    "$python" -m pytest -q -p no:cacheprovider --junitxml="$out/run-$i.xml" "$@" >"$out/run-$i.log" 2>&1
    echo "run $i/$runs: pytest exit $? in $(($(date +%s) - started)) s"
done
"$python" - "$out" "$runs" <<'PY'
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

out, runs = Path(sys.argv[1]), int(sys.argv[2])
counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # runs, failures, errors, skips
for report in sorted(out.glob("run-*.xml")):
    for case in ET.parse(report).iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        c = counts[name]
        c[0] += 1
        c[1] += case.find("failure") is not None
        c[2] += case.find("error") is not None
        c[3] += case.find("skipped") is not None
missing = runs - len(list(out.glob("run-*.xml")))
print(f"\n{'failures':>8} {'errors':>6} {'skips':>5} {'runs':>4}  test")
for name, (ran, failed, errored, skipped) in sorted(counts.items(), key=lambda kv: (-kv[1][1] - kv[1][2], kv[0])):
    print(f"{failed:>8} {errored:>6} {skipped:>5} {ran:>4}  {name}")
bad = sum(c[1] + c[2] for c in counts.values())
print(f"\n{len(counts)} tests, {runs} runs, {bad} failed test runs; logs in {out}")
if missing:
    print(f"{missing} runs wrote no report (collection or start-up failed): see their logs")
sys.exit(1 if bad or missing or not counts else 0)
PY
