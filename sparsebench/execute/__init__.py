"""The parent process: runs cells in worker processes and records what they return.

Nothing here imports TensorFlow: thread pools and oneDNN are fixed when TensorFlow starts,
so each worker process gets its own settings before it imports it.
"""
