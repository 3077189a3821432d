#!/bin/bash
# The issue-33 measurements, one after another on a quiet machine (about 3.5 hours on the
# 2-core EPYC VM): two planted regressions, five A/A tries, the bisect demonstration.
here=$(cd "$(dirname "$0")" && pwd)
cd "$here" || exit 1
./gate.sh hugepages "sed -i 's/^WORKER_DEFAULTS = {\"GLIBC_TUNABLES\": \"glibc.malloc.hugetlb=1\"}/WORKER_DEFAULTS = {}/' sparsebench/execute/orchestrator.py && grep -q '^WORKER_DEFAULTS = {}' sparsebench/execute/orchestrator.py" "Workers: no huge-pages default (planted regression)"
./gate.sh fused1thread 'python3 "$HERE/fused1thread.py"' "Worker: one intra-op thread for the fused variant (planted regression)"
for i in 1 2 3 4 5; do
  ./gate.sh "aa$i" "printf '\n' >> docs/results-format.md" "docs: a blank line (A/A try $i)"
done
./bisect.sh
