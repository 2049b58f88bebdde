"""Serving on Ray Serve.

Driver side: `source.py` (which run, served with which spec), `deploy.py` (gates, deploy / status / stop, config
export), `options.py` (what Serve is told: no Ray, no torch). The application: `app.py` (the replica and what it is
given), `model.py`, `protocol.py`, `auth.py`, `explain.py`, `monitoring.py` (the replica's side of the monitor),
`quantize.py` (int8 and its gate). A causal LM's application: `generate_app.py` (the OpenAI-compatible routes),
`openai_api.py` (their request and reply shapes), `lm.py` (the model, prompts, streamed text), `decoder.py`
(KV-cached continuous batching).
"""
