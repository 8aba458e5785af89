"""Helpers shared by the tests (importable as `helpers` because tests/ is on sys.path under pytest)."""
