"""Container entrypoint and deployment adapters."""
