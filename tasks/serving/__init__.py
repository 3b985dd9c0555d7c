"""Model serving: the HTTP model server (``python -m kiln.tasks.serving``), its deployment file, client, process
and parity check.

Modules: :mod:`.deployment` (what a server serves), :mod:`.app` (the HTTP app), :mod:`.models` (loaded model sets),
:mod:`.batching` (dynamic micro-batching), :mod:`.auth` (bearer token), :mod:`.metrics` (Prometheus series and
statistics). Importing this package imports none of them, so a client does not pay for the server's imports.
"""
