"""gemvlab: a reproduction harness for matrix-vector-product efficiency research."""

__version__ = "0.1.0"
