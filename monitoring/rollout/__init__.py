"""Rollout controller: a pure state machine (``state_machine``) that decides, plus a thin driver that does the I/O.

The state machine takes a rollout plan, the persisted rollout state and one event (an analysis result, a tick, an
operator command, a slot outage) and returns the new state and the actions the driver must execute, in order. It
never reads a clock, a database or the network, so every decision can be tested exhaustively and replayed.
"""
