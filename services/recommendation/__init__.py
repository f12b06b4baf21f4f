"""The recommendation service: item catalog, LightFM model training and registry, serving."""
