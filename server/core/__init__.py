"""The domain: agents, environments, sessions, events. Imports neither mcp, docker nor anthropic."""
