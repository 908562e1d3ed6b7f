"""The registry's alias names, in a module of their own so the pure state machine can name them without MLflow.

`champion` serves the traffic, `challenger` is under rollout, `previous` is the champion before the last
promotion (a post-promotion rollback returns to it).
"""

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous"
