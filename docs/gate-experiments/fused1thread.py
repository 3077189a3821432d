"""The planted regression 'one intra-op thread for the fused layer' (run in a clone's root):
the fused cells lose about 15% of wall time, their instructions do not move."""
from pathlib import Path

p = Path("sparsebench/train/worker.py")
s = p.read_text()
old = "    effect = configure_threads(job.cells[0].threads)\n"
new = ("    threads = job.cells[0].threads\n"
       "    if job.cells[0].model.variant == \"fused_custom_op\":  # planted: one intra-op thread for the fused layer\n"
       "        import dataclasses\n"
       "        threads = dataclasses.replace(threads, intra_op_threads=1)\n"
       "    effect = configure_threads(threads)\n")
assert old in s, "worker.py changed: update the planted edit"
p.write_text(s.replace(old, new, 1))
