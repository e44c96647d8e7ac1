"""Test stand-in for prefect-docker (see ../README.md)."""
