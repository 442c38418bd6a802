"""Open-AutoGLM: an event-driven multimodal ingestion engine on NATS."""

from engine.glm import PromptTemplate

__all__ = ["PromptTemplate"]
__version__ = "0.1.0"
