"""Commands for operators of a fleet of agents (per-function caps), beside the agent."""
