"""Control plane: the versioned traffic policy and slot assignments that the gateway and the model slots poll.

`store` persists them (SQLAlchemy; SQLite locally, Postgres on a cluster), `app` serves them over HTTP with
long-polling and token-protected writes, and `client` is what the gateway, the slots and the rollout controller use.
"""
