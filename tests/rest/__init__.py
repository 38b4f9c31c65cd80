"""Tests of the REST API through the official anthropic SDK (and raw HTTP for the errors)."""
