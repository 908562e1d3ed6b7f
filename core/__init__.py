"""The shared core: what every role folder needs and nothing that belongs to one of them.

Settings, the data contract (schema), synthetic data, the model artifact, process helpers, the one MLflow adapter
(`registry`), the one Evidently adapter (`drift`) and the prediction-log contract (`prediction_log`). This package
imports no other package of the project; the import rules are checked by `tests/test_import_rules.py`.
"""
