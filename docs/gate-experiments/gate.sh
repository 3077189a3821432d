#!/bin/bash
# The self-gate as CI runs it, against one planted commit (README: The self-gate):
#   [TIERS=time,headline] gate.sh NAME 'shell command that changes the clone' 'commit message'
# A = the checkout's HEAD (the reference), B = HEAD + that commit, installed as .ci/run does.
# Output: $WORK/NAME/gate.log (each stage's time, the findings, rc=).
set -u
name=$1; mod=$2; msg=$3
repo=${REPO:-$(git -C "$(dirname "$0")" rev-parse --show-toplevel)}
base=${WORK:-/tmp/sparsebench-gate-experiments}/$name
here=$(cd "$(dirname "$0")" && pwd)
rm -rf "$base"; mkdir -p "$base"
git clone -q "$repo" "$base/repo"
cd "$base/repo" || exit 1
ref=$(git rev-parse HEAD)
HERE=$here bash -c "$mod" || { echo "modification failed"; exit 1; }
git -c user.name=exp -c user.email=exp@example.com commit -q -am "$msg"
t0=$(date +%s)
python3 -m venv "$base/venv" && "$base/venv/bin/pip" install -q --upgrade pip \
  && "$base/venv/bin/pip" install -q ".[test]" > "$base/install.log" 2>&1
echo "B installed in $(( $(date +%s) - t0 )) s" > "$base/gate.log"
export SPARSEBENCH_OPS_CACHE="$base/ops"
"$base/venv/bin/sparsebench" ops build >> "$base/gate.log" 2>&1
start=$(date +%s)
# TIERS=time,headline runs those tiers only (no ledger entry, no drift check).
tiers=()
[ -n "${TIERS:-}" ] && tiers=(--tiers "$TIERS")
SPARSEBENCH_GATE_REFERENCE=$ref "$base/venv/bin/python" .ci/self_gate.py "$base/venv/bin/python" \
  --record results/gate "${tiers[@]}" >> "$base/gate.log" 2>&1
echo "rc=$? self-gate seconds=$(( $(date +%s) - start ))" >> "$base/gate.log"
