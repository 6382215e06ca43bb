"""Developer tools: the embedded peers, `nanogrid-local` and `nanogrid-invoke`. The agent never
imports this package."""
