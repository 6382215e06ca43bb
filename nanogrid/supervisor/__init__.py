"""The parent process: the arbiter loop, HTTP endpoints, sd_notify and the CLI."""
