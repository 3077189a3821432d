"""Where a cell's examples come from: synthetic data, files (libsvm, Criteo, TFRecord) read
into memory, or a tf.data pipeline that reads them inside the timed loop; `open.open_input`
is the one entry the cell uses. `datatool` is `sparsebench data`."""
