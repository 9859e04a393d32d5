"""Local servers for development and the integration tests (see services.py)."""
