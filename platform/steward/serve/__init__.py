"""Serving on Ray Serve: `deploy.py` (driver side), `app.py` (the replica), `protocol.py`, `auth.py`, int8."""
