"""sparsebench: benchmark and profile sparse linear layers and sparse ranking models in TensorFlow.

Importing the package never imports TensorFlow: only the worker process does.
"""

__version__ = "0.2.0"  # the package version (pyproject.toml reads it); CHANGELOG.md says what changed

# What a parent may ask of `python -m sparsebench.train.worker` (bump on any change):
# 1: jobs.json with cells -> <i>.json records; `lockstep`: wait for <i>.go before cell i.
#    (0.2.0 added the job key `round` and whole records, cell identity included; a worker of
#    protocol 1 ignores the key and the parent completes its records, so it stays 1.)
WORKER_PROTOCOL = 1
