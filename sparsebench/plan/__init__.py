"""What to run, as plain data: suites (TOML) expand into cells built from specs.

Nothing here imports TensorFlow or starts a process.
"""
