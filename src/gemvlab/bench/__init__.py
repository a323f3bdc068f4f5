"""What every benchmark shares: the clocks and statistics (``timing``) and random-weight models
of a paper's shape (``models``)."""
