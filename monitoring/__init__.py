"""Watching models in production: the rollout controller (`rollout/`) and the drift monitor (`drift/`).

Neither imports serving, components or pipelines: they talk to them over HTTP, or through `control_plane/`
and `core/`.
"""
