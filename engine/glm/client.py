"""The GLM client: one class, three backends.

``AutoGLM(model_name=..., backend=...)`` talks to

- ``transformers`` (alias ``hf``): a local causal LM — the GLM-4 family
  (``GlmForCausalLM``, ``Glm4ForCausalLM``) or any other — from a directory or
  a model id already in the HF cache; chat template when the tokenizer has one;
  several prompts batched into one left-padded ``generate`` call.
- ``openai`` (alias ``vllm``): any OpenAI-compatible chat-completions endpoint
  (vLLM, Zhipu's GLM API, Ollama, llama.cpp's server), with retries,
  exponential backoff with jitter, and a cap on calls in flight. The API key
  comes from the environment variable named in config, never from a file.
- ``none``: no model; ``generate`` returns ``""``.

Library errors (HTTP, torch, transformers) become :class:`GLMError` here.
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import httpx

from engine.contracts.errors import ConfigError, GLMError
from engine.contracts.types import Clock, Nanos
from engine.glm.prompts import PromptTemplate

if TYPE_CHECKING:
    from engine.config.models import GLMConfig

__all__ = ["AutoGLM", "CircuitBreaker", "PromptTemplate"]

BackendName = Literal["none", "transformers", "hf", "openai", "vllm"]
#: HTTP statuses worth another try: rate limited or a server-side hiccup.
RETRYABLE = frozenset({408, 409, 429, 500, 502, 503, 504})
VLLM_DEFAULT_URL = "http://127.0.0.1:8000/v1"


class Backend(Protocol):
    async def generate_batch(self, prompts: Sequence[str], images: Sequence[bytes | None]) -> list[str]: ...

    async def aclose(self) -> None: ...


class _NoBackend:
    async def generate_batch(self, prompts: Sequence[str], images: Sequence[bytes | None]) -> list[str]:
        return ["" for _ in prompts]

    async def aclose(self) -> None:
        return None


class TransformersBackend:
    """A local causal LM; ``generate`` runs in a worker thread."""

    def __init__(
        self,
        model: str,
        *,
        device: str,
        dtype: str,
        max_new_tokens: int,
        temperature: float,
        seed: int,
        system_prompt: str | None,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from engine.contracts.devices import resolve_device, resolve_dtype

        if not model:
            raise ConfigError(
                ['glm.model: a local directory or cached model id is required for "transformers"']
            )
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        where = "directory" if Path(model).is_dir() else "model id (must already be in the HF cache)"
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
            lm = AutoModelForCausalLM.from_pretrained(model, local_files_only=True, dtype=self.dtype)
        except (OSError, ValueError) as exc:
            raise ConfigError([f"glm.model = {model!r}: cannot load this {where}: {exc}"]) from exc
        self.model = lm.to(self.device).eval()  # type: ignore[arg-type]  # transformers stub quirk
        self.tokenizer.padding_side = "left"  # generation continues on the right
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed
        self.system_prompt = system_prompt
        self._torch = torch
        self._lock = threading.Lock()

    def _render(self, prompt: str) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            return prompt if not self.system_prompt else f"{self.system_prompt}\n\n{prompt}"
        messages = [{"role": "user", "content": prompt}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return str(self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    def generate_sync(self, prompts: Sequence[str]) -> list[str]:
        """All ``prompts`` in one left-padded ``generate`` call."""
        torch = self._torch
        with self._lock, torch.inference_mode():
            try:
                enc = self.tokenizer([self._render(p) for p in prompts], return_tensors="pt", padding=True)
                enc = {k: v.to(self.device) for k, v in enc.items()}
                torch.manual_seed(self.seed)
                out = self.model.generate(
                    **enc,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=self.temperature > 0,
                    temperature=self.temperature if self.temperature > 0 else None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            except (RuntimeError, ValueError, IndexError) as exc:
                raise GLMError(f"transformers generate failed: {exc}") from exc
            new = out[:, enc["input_ids"].shape[1] :]  # (B, new tokens)
            return [str(t).strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    async def generate_batch(self, prompts: Sequence[str], images: Sequence[bytes | None]) -> list[str]:
        return await asyncio.to_thread(self.generate_sync, prompts)

    async def aclose(self) -> None:
        return None


class OpenAIBackend:
    """Chat completions over HTTP, with retries and an in-flight cap."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None,
        timeout_s: float,
        retries: int,
        backoff_s: float,
        max_in_flight: int,
        max_new_tokens: int,
        temperature: float,
        seed: int,
        system_prompt: str | None,
    ) -> None:
        if not base_url or not model:
            raise ConfigError(['glm.base_url and glm.model are required for backend "openai"'])
        self.base_url = base_url.rstrip("/")
        self.model = model
        key = os.environ.get(api_key_env) if api_key_env else None
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed
        self.system_prompt = system_prompt
        self.max_in_flight = max_in_flight
        self._clients: dict[int, tuple[httpx.AsyncClient, asyncio.Semaphore]] = {}

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIBackend(base_url={self.base_url!r}, model={self.model!r})"

    def _client(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        # An httpx client belongs to the loop it first ran on; AutoGLM.generate
        # runs short-lived loops, so keep one per loop.
        loop = id(asyncio.get_running_loop())
        if loop not in self._clients:
            client = httpx.AsyncClient(timeout=self.timeout_s, headers=self._headers)
            self._clients[loop] = (client, asyncio.Semaphore(self.max_in_flight))
        return self._clients[loop]

    def _body(self, prompt: str, image: bytes | None) -> dict[str, Any]:
        content: Any = prompt
        if image is not None:
            uri = "data:image/jpeg;base64," + base64.b64encode(image).decode()
            content = [{"type": "text", "text": prompt}, {"type": "image_url", "image_url": {"url": uri}}]
        messages: list[dict[str, Any]] = [{"role": "user", "content": content}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "seed": self.seed,
        }

    async def complete(self, prompt: str, image: bytes | None = None) -> str:
        client, slots = self._client()
        body = self._body(prompt, image)
        problem = "no attempt made"
        for attempt in range(self.retries + 1):
            retry_after = None
            async with slots:
                try:
                    resp = await client.post(f"{self.base_url}/chat/completions", json=body)
                except httpx.TimeoutException as exc:
                    problem = f"timed out after {self.timeout_s} s ({type(exc).__name__})"
                except httpx.TransportError as exc:
                    problem = f"connection failed: {type(exc).__name__}: {exc}"
                else:
                    if resp.status_code == 200:
                        try:
                            return str(resp.json()["choices"][0]["message"]["content"]).strip()
                        except (ValueError, KeyError, IndexError, TypeError) as exc:
                            raise GLMError(f"{self.base_url}: malformed chat-completions reply") from exc
                    problem = f"HTTP {resp.status_code}: {resp.text[:200]}"
                    if resp.status_code not in RETRYABLE:
                        raise GLMError(f"{self.base_url}: {problem}")
                    retry_after = _retry_after(resp.headers.get("Retry-After"))
            if attempt == self.retries:
                break
            # Exponential backoff with full jitter; a server's Retry-After wins.
            delay = self.backoff_s * (2**attempt) * random.uniform(0.5, 1.5)
            await asyncio.sleep(min(retry_after, 60.0) if retry_after is not None else delay)
        raise GLMError(f"{self.base_url}: {problem} (after {self.retries + 1} attempts)")

    async def generate_batch(self, prompts: Sequence[str], images: Sequence[bytes | None]) -> list[str]:
        return list(
            await asyncio.gather(*(self.complete(p, i) for p, i in zip(prompts, images, strict=True)))
        )

    async def aclose(self) -> None:
        clients, self._clients = self._clients, {}
        for client, _ in clients.values():
            await client.aclose()


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


class CircuitBreaker:
    """Stops calling a failing backend for ``cooldown_s``, then lets one call try.

    closed --(``failures`` in a row)--> open --(cooldown)--> half_open
    half_open --success--> closed; half_open --failure--> open

    ``clock`` returns integer nanoseconds (monotonic by default).
    """

    def __init__(self, failures: int, cooldown_s: float, clock: Clock = time.monotonic_ns) -> None:
        self.failures, self.cooldown_s, self.clock = failures, cooldown_s, clock
        self.cooldown_ns: Nanos = round(cooldown_s * 1_000_000_000)
        self._streak = 0
        self._opened_at: Nanos | None = None
        self._trial = False

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        return "half_open" if self.clock() - self._opened_at >= self.cooldown_ns else "open"

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._trial:
            self._trial = True
            return True
        return False

    def success(self) -> None:
        self._streak, self._opened_at, self._trial = 0, None, False

    def failure(self) -> None:
        self._streak += 1
        if self._trial or self._streak >= self.failures:
            self._opened_at, self._trial = self.clock(), False


class AutoGLM:
    """The GLM client the engine's GLM stage is built on.

    >>> glm = AutoGLM(backend="none")
    >>> glm.generate("hello")
    ''
    """

    def __init__(
        self,
        model_name: str = "",
        backend: BackendName = "none",
        device: str = "auto",
        base_url: str | None = None,
        *,
        dtype: str = "float32",
        api_key_env: str | None = "OPENAI_API_KEY",
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        seed: int = 0,
        timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        max_in_flight: int = 4,
        system_prompt: str | None = None,
    ) -> None:
        self.model_name, self.backend_name = model_name, backend
        self.backend: Backend
        if backend == "none":
            self.backend = _NoBackend()
        elif backend in ("transformers", "hf"):
            self.backend = TransformersBackend(
                model_name,
                device=device,
                dtype=dtype,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                seed=seed,
                system_prompt=system_prompt,
            )
        elif backend in ("openai", "vllm"):
            self.backend = OpenAIBackend(
                base_url or (VLLM_DEFAULT_URL if backend == "vllm" else ""),
                model_name,
                api_key_env=api_key_env,
                timeout_s=timeout_s,
                retries=retries,
                backoff_s=backoff_s,
                max_in_flight=max_in_flight,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                seed=seed,
                system_prompt=system_prompt,
            )
        else:
            raise ConfigError([f"glm.backend = {backend!r}: must be none, transformers, hf, openai or vllm"])

    @classmethod
    def from_config(cls, cfg: GLMConfig) -> AutoGLM:
        return cls(
            cfg.model,
            cfg.backend,
            cfg.device,
            cfg.base_url or None,
            dtype=cfg.dtype,
            api_key_env=cfg.api_key_env or None,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            seed=cfg.seed,
            timeout_s=cfg.timeout_s,
            retries=cfg.retries,
            backoff_s=cfg.backoff_s,
            max_in_flight=cfg.max_in_flight,
            system_prompt=cfg.system_prompt or None,
        )

    async def agenerate(self, prompt: str, image: bytes | None = None) -> str:
        return (await self.backend.generate_batch([prompt], [image]))[0]

    async def agenerate_batch(
        self, prompts: Sequence[str], images: Sequence[bytes | None] | None = None
    ) -> list[str]:
        return await self.backend.generate_batch(prompts, images or [None] * len(prompts))

    def generate(self, prompt: str) -> str:
        """Blocking; for scripts. Inside an event loop use :meth:`agenerate`."""
        if isinstance(self.backend, TransformersBackend):
            return self.backend.generate_sync([prompt])[0]
        return asyncio.run(self._generate_once(prompt))

    async def _generate_once(self, prompt: str) -> str:
        try:
            return await self.agenerate(prompt)
        finally:
            await self.backend.aclose()

    async def aclose(self) -> None:
        await self.backend.aclose()
