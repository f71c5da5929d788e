"""An OpenAI-compatible server for qwenkit models.

`engine.py` batches the decode steps of concurrent requests (continuous batching over the KV
cache's rows) and knows no HTTP; `protocol.py` validates requests and writes OpenAI's error body;
`tool_calls.py` parses the model's Hermes tool calls and holds them back while streaming; `app.py`
is the FastAPI app (routes, serving, server-sent events). The `qwenkit serve` command is
qwenkit/cli/serve.py. Nothing is imported here, so that the CLI stays fast: import the module you need.
"""
