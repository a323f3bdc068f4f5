"""Benchmark helpers shared by every method family: the clocks and statistics (``timing``),
random-weight models of a paper's shape (``models``), and which runs a bench runner takes and
where it may run (``kinds``)."""
