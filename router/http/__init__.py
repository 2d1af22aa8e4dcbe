"""The router's OpenAI-compatible HTTP front door (FastAPI on uvicorn, in the
router's process and event loop): it translates each request into the same
``GenerateRequest`` path as ``Router.Generate`` (validation, admission,
priority pools, cache, failover, traces) and the chunks back into the OpenAI
API's responses and Server-Sent Events."""
