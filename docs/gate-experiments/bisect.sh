#!/bin/bash
# The bisect demonstration: 8 commits on top of the checkout's HEAD, the 4th slows the fused layer.
set -u
repo=${REPO:-$(git -C "$(dirname "$0")" rev-parse --show-toplevel)}
base=${WORK:-/tmp/sparsebench-gate-experiments}/bisect
sparsebench=${SPARSEBENCH:-sparsebench}
rm -rf "$base"; mkdir -p "$base"
git clone -q "$repo" "$base/repo"
cd "$base/repo" || exit 1
good=$(git rev-parse HEAD)
c() { git -c user.name=exp -c user.email=exp@example.com commit -q -am "$1"; }
echo "" >> README.md; c "README: a blank line"
echo "" >> CHANGELOG.md; c "CHANGELOG: a blank line"
sed -i '1s/^/# (bisect demonstration)\n/' sparsebench/execute/env.py; c "env: a comment"
python3 - <<'PY'
from pathlib import Path
p = Path("sparsebench/train/custom_ops/ops.py")
s = p.read_text()
old = "    _accessed(table, bias_x, max_x, watch=watch)\n"
new = old + "    values = values + 0.0 * tf.reduce_sum(tf.sort(values))  # planted: a sort of every entry's value, each step\n"
assert old in s
p.write_text(s.replace(old, new, 1))
PY
c "fused layer: sort the values (the planted slowdown)"
echo "" >> docs/results-format.md; c "results-format: a blank line"
sed -i '1s/^/# (bisect demonstration)\n/' sparsebench/execute/progress.py; c "progress: a comment"
echo "" >> README.md; c "README: another blank line"
sed -i '1s/^/# (bisect demonstration)\n/' sparsebench/execute/counting.py; c "counting: a comment"
bad=$(git rev-parse HEAD)
git log --oneline "$good..$bad" > "$base/commits.txt"
cd "$base" || exit 1
start=$(date +%s)
"$sparsebench" bisect "$good" "$bad" --suite gate --cells 'fused-b512-sgd-*' --repo "$base/repo" --output "$base/work" > "$base/bisect.out" 2> "$base/bisect.err"
echo "rc=$? seconds=$(( $(date +%s) - start ))" >> "$base/bisect.out"
