"""The built-in OpenAI-compatible server, so a model can be served and used on a machine without a GPU
or vLLM:

    MODELDECK_API_KEY=... python -m engine.server --model PATH [--adapter PATH] --served-name NAME --port N

- `api`: the request models (what is accepted, what is refused and how it is said);
- `generation`: the model, transformers' continuous batching, and the plain path for what batching
  cannot honour exactly;
- `app`: the HTTP front (FastAPI + uvicorn): the key, limits, routes, streams, shutdown;
- `metrics`: Prometheus metrics through prometheus_client.

The port opens only once the model is loaded, so /health answering means "ready" (as with vLLM). The key
comes from the environment, never the command line (which `ps` shows to everyone).
"""
