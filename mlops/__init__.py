"""Shared core of the MLOps template: settings, the data schema, synthetic data and the `mlops` CLI.

Domain logic lives in the role folders (components/, pipelines/, serving/, monitoring/);
this package holds only what every one of them needs.
"""

import warnings

__version__ = "0.1.0"

# MLflow warns, while `mlflow.pyfunc` is being imported, that PythonModel.predict lacks type hints. Ours has
# none on purpose (hints would become a schema that rejects DataFrames); the warning only confuses users.
warnings.filterwarnings("ignore", message=r".*type hints to the .predict. method", category=UserWarning)
