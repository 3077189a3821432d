"""sparsebench: benchmark and profile sparse linear layers and sparse ranking models in TensorFlow.

Importing the package never imports TensorFlow: only the worker process does.
"""

__version__ = "0.1.0"
