"""What every package of the agent shares: the config, the error tree, exit codes, logging."""
