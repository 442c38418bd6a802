"""The README's and the docs pages' promises, run as written, and their links."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

from engine.runtime.engine import Engine
from tests.conftest import make_config

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_starts_with_the_two_commands() -> None:
    head = README.splitlines()[:10]
    assert any(line.startswith("make demo") for line in head)
    assert any(line.startswith("make test") for line in head)


async def test_the_plain_nats_py_example_gets_a_result_and_a_dlq_record(nats_url: str) -> None:
    wire = (ROOT / "docs" / "wire.md").read_text()
    code = re.search(r"^#+ Publishing from any NATS client\n\n```python\n(.*?)```", wire, re.S | re.M)
    assert code is not None
    script = code.group(1).replace("nats://127.0.0.1:4222", nats_url)
    routes = [{"modality": "text", "processor": "minilm"}]
    engine = Engine(
        make_config("autoglm", routes=routes, aligner={"window_ms": 1000, "idle_timeout_ms": 1000})
    )
    await engine.start(nats_url)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        await engine.stop()
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert any(line.startswith("autoglm.out.kitchen ") and "kitchen-caption-1" in line for line in lines)
    assert any(line.startswith("autoglm.dlq.kitchen ") and '"invalid_utf8"' in line for line in lines)


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    found = set()
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
        found.add(slug.replace(" ", "-"))
    return found


def links(text: str) -> list[str]:
    """Targets of ``[text](target)`` links outside code blocks and code spans."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "code", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_every_relative_link_in_the_readme_and_the_docs_points_at_something_there() -> None:
    assert len(PAGES) > 5, "docs/*.md went missing"
    broken = []
    for page in PAGES:
        text = page.read_text()
        for target in links(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # http:, https:, mailto:
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken


def test_every_docs_page_is_linked_from_the_readme_and_links_back() -> None:
    readme_links = set(links(README))
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme_links, f"README does not link docs/{page.name}"
        assert "../README.md" in links(page.read_text()), f"docs/{page.name} does not link back"


def test_the_architecture_tree_names_every_module_there_is() -> None:
    """The README's Architecture block is the map of engine/ and processors/; a
    module added, moved or removed without it makes the map wrong."""
    section = README.split("## Architecture\n", 1)[1]
    block = re.search(r"```\n(.*?)```", section, re.S)
    assert block is not None
    named: set[str] = set()
    top = package = ""
    for line in block.group(1).splitlines():
        head = re.match(r"^( *)(\w+)/ ", line)
        if head:
            if head.group(1):
                package = f"{top}/{head.group(2)}"
            else:
                top = package = head.group(2)
        named |= {f"{package}/{name}.py" for name in re.findall(r"\b(\w+)\.py\b", line)}
    there = {
        p.relative_to(ROOT).as_posix()
        for top_level in ("engine", "processors")
        for p in (ROOT / top_level).rglob("*.py")
        if p.name != "__init__.py" or p.parent.name == "engine"
    }
    assert named == there, f"not in the tree: {sorted(named - there)}; not named: {sorted(there - named)}"
