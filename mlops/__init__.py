"""Shared core of the MLOps template: settings, the data schema, synthetic data and the `mlops` CLI.

Domain logic lives in the role folders (components/, pipelines/, serving/, monitoring/);
this package holds only what every one of them needs.
"""

__version__ = "0.1.0"
