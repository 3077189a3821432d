"""How a cell is measured: the timed windows, Hogwild threads, GPU sampling, TensorFlow's
profiler, and the TensorFlow facts every record carries."""
