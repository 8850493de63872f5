"""Plans for people: a table, a Chrome trace, a memory plot, and checkpoint summaries.

Everything here reads plans and their liveness; nothing writes back into the planner.
"""
