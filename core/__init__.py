"""The bottom layer every package imports: errors, quantization math, numerics, atomic files, progress.

It imports no other package of the project, so frontends, calibration, passes and backends can
all reach it without importing the pass suite.
"""
