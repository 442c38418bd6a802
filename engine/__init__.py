"""Open-AutoGLM: an event-driven multimodal ingestion engine on NATS."""

from engine.glm.client import AutoGLM
from engine.glm.prompts import PromptTemplate

__all__ = ["AutoGLM", "PromptTemplate"]
__version__ = "0.1.0"
