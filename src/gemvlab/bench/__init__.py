"""Benchmark helpers shared by every method family: the clocks and statistics (``timing``) and
random-weight models of a paper's shape (``models``)."""
