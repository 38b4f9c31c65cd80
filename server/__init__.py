"""managed-agents-mcp control plane: MCP tools, domain services, store and agent loop."""
