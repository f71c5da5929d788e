"""An OpenAI-compatible server for qwenkit models.

`engine.py` batches the decode steps of concurrent requests (continuous batching over the KV
cache's rows), `schemas.py` validates requests and parses tool calls, `app.py` is the FastAPI app,
and `commands.py` holds the `qwenkit serve` command. Nothing is imported here, so that the CLI
stays fast: import the module you need.
"""
