"""sparsebench: benchmark and profile sparse linear layers and sparse ranking models in TensorFlow.

Importing the package never imports TensorFlow: only the worker process does.
"""

__version__ = "0.1.0"

# What a parent may ask of `python -m sparsebench.train.worker` (bump on any change):
# 1: jobs.json with cells -> <i>.json records; `lockstep`: wait for <i>.go before cell i.
WORKER_PROTOCOL = 1
