"""`hysac-serve`: HySAC as an OpenAI-compatible service (embeddings, moderation, safe search) on LitServe.

A thin shell over the same code as the pipelines: `api.py` is the batching worker (`handler.RequestRunner`, shipped in
every model folder, which runs the pipelines' steps on batches of requests), `spec.py` the OpenAI-shaped routes,
`edge.py` the API key, limits, bounded queue, error shape and metrics, `cli.py` the command. Needs the `serve` extra
(`pip install 'hysac-hf[serve]'`: litserve, prometheus-client).
"""
