"""The GLM: backends, prompts, and the stage that calls it."""
