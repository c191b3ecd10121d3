"""`lmforge serve`: one OpenAI-compatible HTTP server for every lmforge model, with a playground.

    app.py      the FastAPI app: routes, playground page, API key, error answers, metrics, lifecycle
    routes.py   check requests, call the engine, shape OpenAI-style answers
    bodies.py   request bodies (strict pydantic models) and one-line errors for bad ones
    engine.py   one engine per model: its queue, its model thread, batching of every kind of job
    loading.py  what a served model is and what it can do
    batcher.py  continuous batching of completions over the model's KV cache
    metrics.py  Prometheus metrics
    config.py   `Limits` (what a request may ask) and `EngineOptions` (how a model is run)
    static/     the playground (plain HTML, CSS and JavaScript; nothing fetched from elsewhere)

An interface layer like the CLI: routes validate, then call the library (generation's logit processors,
`recipes.embed.encode_sentences`, `recipes.fill_mask.predict_masks`, `recipes.attention.attention_matrix`,
task models' `predict`); batching and queueing live in the engine; routes never touch tensors.
"""
