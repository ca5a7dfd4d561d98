"""The engine: configuration, heartbeats, decisions, scripts, checkers, API and CLI."""
