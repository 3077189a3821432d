"""How a sparsebench process imports TensorFlow: without the Keras import TensorFlow starts
on its own.

`import tensorflow` ends with an eager `import keras.src.optimizers` (for Keras' SavedModel
registrations), which pulls in most of Keras: 1.0-1.6 s of a 6.7 s import on the 2-core EPYC
VM. sparsebench builds no Keras object, and every worker, cluster task, data tool and op
build pays the import again. TensorFlow catches an ImportError there and goes on, so the
module is marked absent for the length of the import and unmarked after it: `tf.keras`, or
a user's own variant that imports Keras, still loads it on first use. Records carry the
import's time (`worker.tf_import_s`)."""

from __future__ import annotations

import sys
from types import ModuleType

KERAS_EAGER_IMPORT = "keras.src.optimizers"


def import_tensorflow() -> ModuleType:
    """TensorFlow, imported now if it is not yet (call before anything else imports it)."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    marked = KERAS_EAGER_IMPORT not in sys.modules
    if marked:
        sys.modules[KERAS_EAGER_IMPORT] = None  # an import of it raises ModuleNotFoundError
    try:
        import tensorflow
    finally:
        if marked and KERAS_EAGER_IMPORT in sys.modules and sys.modules[KERAS_EAGER_IMPORT] is None:
            del sys.modules[KERAS_EAGER_IMPORT]
    return tensorflow
