"""The monitor page in a real headless Chromium (Debian's, driven by Playwright).

An engine (passthrough processors, an OpenAI-compatible chat server on
loopback for answers) on the test nats-server, ``autoglm monitor`` as its own
process, a short multimodal stream: the DOM must show the source cards with
a thumbnail, moving counters and the GLM answer, the rejections panel must
name the reason of a bad event, and a click must open a source's timeline.

Never ``playwright install``: the browser is ``/usr/bin/chromium`` (``.ci/run``
installs it when missing). Without it the test skips, saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from engine.runtime.engine import Engine
from tests.chat_server import ChatServer
from tests.conftest import make_config, send

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("AUTOGLM_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
#: Set to a path to keep the page's screenshot there (docs/monitor.png was made so).
SCREENSHOT = os.environ.get("AUTOGLM_MONITOR_SCREENSHOT")

pytestmark = pytest.mark.skipif(
    not shutil.which(CHROMIUM),
    reason=f"NO BROWSER: {CHROMIUM} is missing (apt-get install -y chromium; .ci/run does it)",
)


def frame(k: int, source: int) -> bytes:
    img = np.zeros((120, 160, 3), np.uint8)
    img[:] = (40 + 60 * source, 80, 200 - 50 * source)
    cv2.circle(img, (20 + 12 * k, 60), 18, (255, 255, 255), -1)
    return cv2.imencode(".jpg", img)[1].tobytes()


@contextlib.asynccontextmanager
async def monitor_process(nats_url: str, prefix: str) -> AsyncIterator[str]:
    """``autoglm monitor`` in its own process; yields the URL it prints."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine.tools.cli", "monitor", "--nats-url", nats_url,
        "--prefix", prefix, "--port", "0",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        if "autoglm monitor: http" not in line:
            raise AssertionError(f"the monitor did not start: {line!r} {(await proc.stderr.read()).decode()}")
        yield line.split()[2]
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 20) == 0  # SIGTERM: a clean exit


async def test_the_page_shows_sources_answers_and_rejections_in_chromium(
    nats_url: str, prefix: str, nc: Any, tmp_path: Path
) -> None:
    from playwright.async_api import async_playwright, expect

    glm = {"backend": "openai", "model": "glm-4", "trigger": "every", "retries": 0}
    async with (
        ChatServer(lambda n, body: ("ok", f"a white ball rolls ({n})")) as chat,
        monitor_process(nats_url, prefix) as url,
        async_playwright() as pw,
    ):
        engine = Engine(make_config(prefix, glm={**glm, "base_url": chat.url}))
        await engine.start(nats_url)
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 900})
            await page.goto(url)
            await expect(page.locator("#conn")).to_have_text("live", timeout=20_000)
            ts = time.time_ns()
            for k in range(4):
                for s in range(3):
                    src, at = f"cam{s}", ts + k * 150_000_000
                    await send(nc, prefix, src, "image", frame(k, s), at, event_id=f"{src}-i{k}")
                    await send(nc, prefix, src, "text", f"caption {k}".encode(), at, event_id=f"{src}-t{k}")
            await nc.flush()

            for s in range(3):
                card = page.locator(f'#cards .card[data-source="cam{s}"]')
                await expect(card.locator("img.thumb")).to_be_visible(timeout=20_000)
                await expect(card.locator(".answer")).to_contain_text("a white ball rolls", timeout=20_000)
            loaded = await page.eval_on_selector('.card[data-source="cam0"] img.thumb', "i => i.naturalWidth")
            assert loaded == 160  # the browser decoded the frame the monitor served
            await expect(page.locator("#counter-results")).not_to_have_text("0", timeout=20_000)
            await expect(page.locator("#glm-calls")).not_to_have_text("0", timeout=20_000)
            await expect(page.locator('#sparks [data-series="in:image"]')).to_be_visible(timeout=20_000)
            await expect(page.locator("#engines tbody tr")).to_have_count(1)

            await nc.publish(f"{prefix}.in.cam1.image", b"no headers at all")  # missing_timestamp
            await nc.flush()
            reason = page.locator('#reasons tr[data-reason="missing_timestamp"]')
            await expect(reason).to_be_visible(timeout=20_000)
            await expect(page.locator('#dlq-last li[data-reason="missing_timestamp"]')).to_contain_text(
                "AutoGLM-Timestamp"
            )
            await expect(page.locator('.card[data-source="cam1"] .badges .rej')).to_contain_text(
                "missing_timestamp"
            )

            await page.locator('.card[data-source="cam2"] h3').click()
            dialog = page.locator("dialog#timeline")
            await expect(dialog).to_be_visible()
            await expect(page.locator("#timeline-title")).to_contain_text("cam2")
            await expect(page.locator("#timeline-rows tr").first).to_contain_text("image")
            await page.screenshot(path=str(SCREENSHOT or tmp_path / "monitor.png"), full_page=True)
            await page.keyboard.press("Escape")

            # 200 sources: paged, 24 cards in the DOM at a time, and a filter
            at = time.time_ns()
            for s in range(3, 200):
                await send(nc, prefix, f"cam{s}", "text", b"one of many", at, event_id=f"cam{s}-t")
            await nc.flush()
            await expect(page.locator("#source-count")).to_have_text("200", timeout=30_000)
            await expect(page.locator("#cards .card")).to_have_count(24)
            await expect(page.locator("#page")).to_have_text("1 / 9")
            await page.locator("#next").click()
            await expect(page.locator("#page")).to_have_text("2 / 9")
            await page.locator("#filter").fill("cam19")
            await expect(page.locator("#cards .card")).to_have_count(11)  # cam19, cam190..cam199
            await expect(page.locator('#cards .card[data-source="cam199"] .answer')).to_contain_text(
                "a white ball rolls", timeout=20_000
            )
        finally:
            await browser.close()
            await engine.stop()
