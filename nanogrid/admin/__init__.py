"""Commands for operators of a fleet of agents (per-function caps, dead letters, outboxes),
beside the agent."""
