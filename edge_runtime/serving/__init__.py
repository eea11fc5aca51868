"""Serving layer: CLI, scheduler, worker, batch tuner and the HTTP server. It talks to the
runtime only through its public API (Runtime, load)."""
