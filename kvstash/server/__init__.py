"""The OpenAI-compatible HTTP server (``kvstash serve``): ``kvstash.server.app.create_app`` and ``serve``.

Nothing is imported here so that ``kvstash --help`` does not load FastAPI and the engine.
"""
