"""najimi's four gRPC services; `python -m services` runs them all for development."""
