"""The engine's message contract as an AsyncAPI document, from a FastStream app.

The engine reads and writes with nats-py on its hot path, so this app is not
what runs: it declares the same subjects (from
:mod:`engine.contracts.subjects`) and the payload schemas of the records the
engine publishes (:mod:`engine.contracts.records`) for FastStream's AsyncAPI
generator. ``docs/asyncapi.json`` is generated from it (and a test checks the
committed file still matches)::

    .venv/bin/python -m engine.wire.asyncapi > docs/asyncapi.json
    .venv/bin/faststream docs gen engine.wire.asyncapi:app --out docs/asyncapi.json  # the same
"""

from __future__ import annotations

from faststream import FastStream
from faststream.nats import NatsBroker
from faststream.specification import AsyncAPI

from engine import __version__
from engine.contracts.records import Rejection, Result
from engine.contracts.subjects import Subjects

#: The documented addresses: the default prefix's, built by the one module
#: that builds every subject.
SUBJECTS = Subjects()

broker = NatsBroker(logger=None, apply_types=False)


@broker.subscriber(
    SUBJECTS.input_pattern(),
    title="input",
    description=(
        "Raw payload bytes. Headers: AutoGLM-Timestamp (ns, required), Content-Type (required: "
        "image/jpeg, image/png, image/x-raw;format=bgr8;width=W;height=H, audio/wav, "
        "audio/pcm;rate=R;channels=C;format=s16le|f32le, text/plain;charset=utf-8), "
        "Nats-Msg-Id, AutoGLM-Seq, traceparent (optional)."
    ),
)
async def input_event(body: bytes) -> None:
    """Documentation only: the engine consumes this subject with nats-py."""


broker.publisher(SUBJECTS.result_pattern(), title="result", schema=Result, description=Result.__doc__)
broker.publisher(SUBJECTS.dlq_pattern(), title="rejected", schema=Rejection, description=Rejection.__doc__)
broker.publisher(
    SUBJECTS.late_pattern(),
    title="late",
    schema=Rejection,
    description='A too_late rejection, sent here instead of the DLQ when aligner.late_to = "late".',
)

spec = AsyncAPI(broker, title="Open-AutoGLM", version=__version__, description=__doc__.split("\n")[0])
app = FastStream(broker, specification=spec)


def document() -> str:
    return spec.to_specification().to_json()


if __name__ == "__main__":
    print(document())
