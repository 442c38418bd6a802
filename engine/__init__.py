"""Open-AutoGLM: an event-driven multimodal ingestion engine on NATS."""

from engine.glm import AutoGLM
from engine.prompts import PromptTemplate

__all__ = ["AutoGLM", "PromptTemplate"]
__version__ = "0.1.0"
