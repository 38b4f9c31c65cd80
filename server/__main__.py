"""`python -m server` runs the `managed-agents-mcp` command."""

from server.cli import main

raise SystemExit(main())
