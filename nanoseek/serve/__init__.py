"""The OpenAI-compatible server over the engine (`nanoseek serve`): app.py builds the
FastAPI app; protocol.py holds OpenAI's schemas. Importing this package imports no torch
until an engine is built."""
