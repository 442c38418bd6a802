"""The command line and the tools around the engine: publish, replay, demo."""
