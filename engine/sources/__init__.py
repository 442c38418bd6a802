"""Real streams in, results out: ``from engine.sources import Producer, Results``.

:class:`Producer` (producer.py) puts events on the wire contract; the media
and text readers (reader.py with media.py, video.py, audio.py; text.py) turn
files, streams and devices into those events, on a thread behind pump.py;
:class:`Results` (results.py) reads the records back. ``engine`` itself
offers both too (``from engine import Producer``), loaded on first use.
"""

from engine.sources.producer import Producer
from engine.sources.results import Results

__all__ = ["Producer", "Results"]
