"""One model's engine, knowing nothing of actors: `api` (the protocol and the one
factory), `thread` and `core` (in-process), `process`, `pipes`, `spawn` and `worker`
(a worker process), `sampling`, `text` (stop strings), the prefix cache, and `loaders`
(where models come from: MLX directories, GGUF files, Ollama's store).

Owners import from `corral.engine.api`. Every MLX call runs in one engine thread, in this
process or in a worker's.
"""
