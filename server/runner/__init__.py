"""The agent loop: model calls, tool execution in sandboxes, session workers."""
