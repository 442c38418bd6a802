"""The GLM client: templates, the transformers backend on a tiny real GLM, the
openai backend against a real HTTP server, and the circuit breaker."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from engine import AutoGLM, PromptTemplate
from engine.contracts.errors import ConfigError, GLMError
from engine.glm.client import CircuitBreaker
from engine.glm.prompts import History
from tests.chat_server import ChatServer

WORDS = "the a cat dog image audio text source window scene is quiet loud moving describe what happening none"


def build_tiny_glm(path: Path) -> Path:
    """A randomly initialised GlmForCausalLM + word-level tokenizer, saved like a real checkpoint."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GlmConfig, GlmForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *WORDS.split()])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    fast.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    cfg = GlmConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
        pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    GlmForCausalLM(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_glm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_glm(tmp_path_factory.mktemp("glm"))


def test_prompt_template_fills_and_names_problems() -> None:
    assert (
        PromptTemplate("请简要介绍人工智能：{topic}").format(topic="发展历程")
        == "请简要介绍人工智能：发展历程"
    )
    with pytest.raises(ConfigError, match="missing variable\\(s\\) topic"):
        PromptTemplate("{topic}").format()
    with pytest.raises(ConfigError, match="unknown variable\\(s\\) extra"):
        PromptTemplate("{topic}").format(topic="x", extra="y")


def test_history_is_bounded_in_count_and_characters() -> None:
    h = History(max_items=2, max_chars=40)
    assert h.render() == "none"
    for i in range(3):
        h.add(i, i + 1, f"answer {i}")
    assert len(h) == 2
    assert h.render() == "[1..2] answer 1\n[2..3] answer 2"
    h.add(3, 4, "x" * 100)
    assert len(h.render()) <= 40


def test_none_backend() -> None:
    assert AutoGLM(backend="none").generate("hi") == ""


def test_transformers_backend_on_a_tiny_glm(tiny_glm: Path) -> None:
    glm = AutoGLM(model_name=str(tiny_glm), backend="transformers", device="cpu", max_new_tokens=6)
    assert type(glm.backend).__name__ == "TransformersBackend"
    assert type(glm.backend.model).__name__ == "GlmForCausalLM"  # type: ignore[attr-defined]
    one = glm.generate("the cat is moving")
    assert isinstance(one, str) and one == glm.generate("the cat is moving")  # greedy, seeded
    batch = asyncio.run(glm.agenerate_batch(["the cat is moving", "describe the scene", "a dog"]))
    assert len(batch) == 3 and all(isinstance(b, str) for b in batch)
    assert AutoGLM(model_name=str(tiny_glm), backend="hf", device="cpu").generate("a") is not None


def test_transformers_backend_refuses_a_missing_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot load"):
        AutoGLM(model_name=str(tmp_path / "nope"), backend="transformers")


def openai(url: str, **kw: Any) -> AutoGLM:
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("timeout_s", 2.0)
    return AutoGLM(model_name="glm-4", backend="openai", base_url=url, **kw)


async def test_openai_backend_answers_and_sends_the_key_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_GLM_KEY", "sk-secret")
    async with ChatServer() as srv:
        glm = openai(srv.url, api_key_env="TEST_GLM_KEY", system_prompt="be brief")
        assert await glm.agenerate("hello there") == "seen: hello there"
        await glm.aclose()
    assert srv.headers[0]["authorization"] == "Bearer sk-secret"
    assert srv.requests[0]["model"] == "glm-4"
    assert srv.requests[0]["messages"][0] == {"role": "system", "content": "be brief"}
    assert "sk-secret" not in repr(glm.backend)


async def test_openai_retries_429_and_5xx_then_succeeds() -> None:
    script = [("status", 429), ("status", 503), ("ok", "finally")]
    async with ChatServer(lambda n, b: script[n]) as srv:
        glm = openai(srv.url, retries=3)
        assert await glm.agenerate("x") == "finally"
        await glm.aclose()
    assert len(srv.requests) == 3


async def test_openai_gives_up_after_retries_and_does_not_retry_4xx() -> None:
    async with ChatServer(lambda n, b: ("status", 500)) as srv:
        glm = openai(srv.url, retries=2)
        with pytest.raises(GLMError, match=r"HTTP 500.*after 3 attempts"):
            await glm.agenerate("x")
        await glm.aclose()
    assert len(srv.requests) == 3
    async with ChatServer(lambda n, b: ("status", 400)) as srv:
        glm = openai(srv.url, retries=5)
        with pytest.raises(GLMError, match="HTTP 400"):
            await glm.agenerate("x")
        await glm.aclose()
    assert len(srv.requests) == 1


async def test_openai_timeout_and_unreachable_server() -> None:
    async with ChatServer(lambda n, b: ("hang", None)) as srv:
        glm = openai(srv.url, timeout_s=0.2, retries=1)
        with pytest.raises(GLMError, match="timed out"):
            await glm.agenerate("x")
        await glm.aclose()
    glm = openai("http://127.0.0.1:9/v1", retries=0)
    with pytest.raises(GLMError, match="connection failed"):
        await glm.agenerate("x")
    await glm.aclose()


async def test_openai_in_flight_cap_and_images() -> None:
    async with ChatServer(lambda n, b: ("slow", 0.1)) as srv:
        glm = openai(srv.url, max_in_flight=2)
        answers = await glm.agenerate_batch([f"p{i}" for i in range(6)], [b"\xff\xd8jpeg", *[None] * 5])
        await glm.aclose()
    assert answers == [f"seen: p{i}" for i in range(6)]
    assert srv.max_active == 2
    parts = next(r for r in srv.requests if not isinstance(r["messages"][-1]["content"], str))["messages"][-1]
    assert parts["content"][1]["image_url"]["url"].startswith("data:image/jpeg;base64,")


def test_circuit_breaker_opens_cools_down_and_tries_once() -> None:
    now = [0]  # the clock is integer nanoseconds
    b = CircuitBreaker(failures=2, cooldown_s=10, clock=lambda: now[0])
    assert b.allow() and b.state == "closed"
    b.failure()
    assert b.state == "closed"
    b.failure()
    assert b.state == "open" and not b.allow()
    now[0] = 10 * 10**9 - 1
    assert b.state == "open"
    now[0] = 10 * 10**9
    assert b.state == "half_open"
    assert b.allow() and not b.allow()  # one trial call only
    b.failure()
    assert b.state == "open"
    now[0] = 20 * 10**9
    assert b.allow()
    b.success()
    assert b.state == "closed" and b.allow()
