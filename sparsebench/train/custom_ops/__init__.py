"""The fused custom op: the sparse layer (normalization included) as C++ TensorFlow ops.

`fused_layer.cc` is the source (shipped in the package), `build.py` compiles and caches
it, `ops.py` wraps the ops for the model and registers their gradient.
"""
