"""The worker process and everything it builds: the only side that imports TensorFlow.

`python -m sparsebench.train.worker` is started by the parent (`sparsebench.execute`);
it builds data, model and optimizer for each cell, times the training step and writes
one record per cell.
"""
