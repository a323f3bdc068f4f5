"""Benchmark helpers shared by every method family: timing, random paper-shape models, and
which runs a bench runner takes and where it may run."""
