"""Reading results files: reports, plots, HTML pages and the regression gate.

Nothing here imports TensorFlow or re-runs a cell.
"""
