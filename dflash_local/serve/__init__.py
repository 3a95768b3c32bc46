"""`dflash serve`: an OpenAI-compatible HTTP server over one engine (app: routes, worker: the generation thread)."""
