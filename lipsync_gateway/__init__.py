"""A browser viewer for the compositing service: an HTTP gateway that turns an uploaded clip into a frame stream.

``lipsync-gateway --port P --server HOST:PORT`` serves the page (``/``), ``/healthz``, ``/models`` and
``POST /session``; see ``server.py``.
"""
