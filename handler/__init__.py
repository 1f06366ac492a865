"""The HTTP layer: a Starlette app over the engine's executor. No torch here."""
