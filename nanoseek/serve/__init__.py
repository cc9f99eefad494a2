"""nanoseek's OpenAI-compatible server."""
