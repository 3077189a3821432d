"""Parameter-server cells: a local cluster of TensorFlow servers (`cluster`, `cluster_task`),
the training on TensorFlow's ParameterServerStrategy (`distributed`), and one PS cell
from its cluster's start to its record (`cell`)."""
