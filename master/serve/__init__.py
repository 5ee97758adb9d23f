"""`tpi serve`: an OpenAI-compatible HTTP API and a chat page (app factory in
app.py, routes in endpoints.py, request shapes in protocol.py, the generation
queue in jobs.py), in the shape of vLLM's entrypoints/openai."""
