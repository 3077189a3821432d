"""The complete model a cell trains: the trainer (discretizer, normalization, sparse layer,
head, train step), the kernel variants of the sparse layer, the optimizers, and where it
runs (CPU or GPU)."""
