"""The OpenAI-compatible API beside the UI (server.py: routes; openai_schema.py: request checks;
responses.py: response shapes; metrics.py: Prometheus; errors.py: OpenAI's error shape;
security.py: who may listen where), and the client that drives a remote OpenAI-compatible server
as if it were a local engine (remote.py, with remote_metrics.py reading its /metrics), for the UI.

Imports run one way: api -> chat/engine -> model; the UI never imports the server."""
