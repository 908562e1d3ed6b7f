"""Rollback and fault scenarios: the file format (`spec`), the runner, the judge and the challenger models."""
