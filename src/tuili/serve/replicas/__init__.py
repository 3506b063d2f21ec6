"""`tuili serve --replicas N`: one model's engine as N Ray Serve replicas behind one HTTP surface.

Parts (each module's docstring says why it is so):
- `launch.py`    start or join Ray, deploy the engine replicas, serve the usual FastAPI app
- `replica.py`   the engine deployment: one `AsyncEngine` per replica, deltas streamed back
- `remote.py`    `RemoteEngine`: `AsyncEngine`'s surface on the HTTP side, forwarding to replicas
- `routing.py`   the routing policy as plain data and functions (no Ray): prefix index, scores
- `routers.py`   Ray Serve request routers (cache-aware, pow2, round-robin) over routing.py
- `stats.py`     per-replica and summed figures for /metrics and /v1/stats

Nothing here is imported by `tuili serve` without `--replicas`, so a plain server never
imports Ray.
"""
