"""The runtime kit every najimi service is built on: one module per concern."""
