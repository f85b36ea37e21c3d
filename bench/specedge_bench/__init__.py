"""SpecEdge's benchmarks, apart from the product: what they measure never ships in a
service, and their dependencies (psutil, tqdm, matplotlib) are theirs alone.

- `serving` — `specedge bench`: the real system, modes side by side, the paper's table
- `verify` — `specedge bench-verify`: the verifier engine's step per attention backend
- `modes`, `acceptance`, `agreement`, `exactness` — the engine in one process
- `simulator` — the scheduling policy driven by timing models (the paper's setting)
- `scheduler_load`, `scheduler_tracing` — a real scheduler under 1000 edges' traffic; tracing overhead
- `plane` — the message plane's overhead per cycle over real services
"""
