"""Helpers shared by the test packages (importable: tests/conftest.py puts the
repository root on ``sys.path``)."""
