"""The HTTP gateway: OpenAI- and TEI-compatible endpoints in front of the task streams."""
