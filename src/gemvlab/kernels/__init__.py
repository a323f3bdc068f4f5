"""GPU kernels for the papers' hot loops, and pure benchmark functions that time them."""
