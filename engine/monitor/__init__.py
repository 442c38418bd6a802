"""``autoglm monitor``: a live, read-only page of what the engines on a NATS do.

state.py (sans-I/O: records and stats in, views out), cards.py (one source's
card), rates.py (the engines' counters as rates and sums), feed.py (the NATS
side), app.py (the Starlette routes and the event stream), server.py (the
process); the page itself is static/ (HTML, CSS, JavaScript: no build).
"""
