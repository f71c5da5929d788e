"""`qwenkit serve`: the OpenAI-compatible server (qwenkit.server) as a command.

FastAPI, uvicorn and torch are imported inside, so that `qwenkit --help` stays fast.
"""

from __future__ import annotations

import os

from qwenkit.cli.common import WeightFlags, Weights, load_from_flags
from qwenkit.errors import UserError

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def serve(
    *,
    model: str = "default",
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    max_model_len: int | None = None,
    served_model_name: str | None = None,
    max_body_mb: float = 4.0,
    weights: WeightFlags = Weights(),
) -> int:
    """Serve a model over the OpenAI API: /v1/chat/completions (tools, streaming), /v1/completions,
    /v1/models and /health, for the official `openai` client or anything that speaks its protocol.

    Concurrent requests share the model: one engine loop decodes all of them together, a request
    joining or leaving between two steps (continuous batching). Past --max-batch running and
    --max-queue waiting requests, calls get 429. Sampling defaults come from the checkpoint's
    generation_config.json; a request's own temperature, top_p, ... override them.

    Args:
        model: a checkpoint folder, a .gguf file, a hub id, or "default" (a 135M stand-in; see `qwenkit models`).
        host: the address to listen on; 127.0.0.1 serves this machine only, anything else
            exposes the model to the network (set --api-key then).
        port: the TCP port.
        api_key: require 'Authorization: Bearer KEY' on /v1/ calls (default: $QWENKIT_API_KEY
            if set, which keeps the key out of the process list).
        max_batch: requests decoded together (rows of the KV cache, allocated up front).
        max_queue: requests that may wait for a row; more are answered 429.
        max_model_len: tokens per request, prompt and completion (default: the model's context,
            at most 4096). The KV cache holds max_batch x max_model_len tokens.
        served_model_name: the model id clients send (default: the folder's name).
        max_body_mb: larger request bodies are answered 413 (megabytes of 2**20 bytes).
    """
    try:  # the serve extra: a clear message rather than a traceback without it
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError("serving needs FastAPI and uvicorn: pip install 'qwenkit[serve]'") from None
    if max_batch < 1 or max_queue < 0:
        raise UserError(f"--max-batch must be >= 1 and --max-queue >= 0, got {max_batch} and {max_queue}")
    if max_model_len is not None and max_model_len < 2:
        raise UserError(f"--max-model-len must be >= 2, got {max_model_len}")
    from qwenkit.hub import resolve_model
    from qwenkit.server.app import create_app
    from qwenkit.server.engine import Engine

    folder = resolve_model(model)
    m, tok = load_from_flags(folder, weights.dtype, weights.quantize, weights.adapter)
    api_key = api_key or os.environ.get("QWENKIT_API_KEY") or None
    name = served_model_name or ("default" if model == "default" else folder.resolve().name)
    engine = Engine(m, tok, max_batch=max_batch, max_queue=max_queue, max_model_len=max_model_len)
    app = create_app(engine, name, api_key=api_key, max_body_bytes=int(max_body_mb * 2**20))
    if host not in _LOOPBACK and not api_key:
        print(f"warning: serving on {host} without --api-key: anyone who can reach this port can use the model")
    print(
        f"serving {name} at http://{host}:{port}/v1 (max batch {max_batch}, queue {max_queue}, "
        f"{engine.max_len} tokens per request)"
    )
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    return 0


COMMANDS = {"serve": serve}
