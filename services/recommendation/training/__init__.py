"""Training: the data a model learns from, its features, the fit, its evaluation, the run."""
