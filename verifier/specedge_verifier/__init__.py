"""SpecEdge verifier: the GPU worker that holds the target model and per-session KV caches.

Owns prefill, batched tree verification and committing accepted tokens. It is thin:
admission and batching are the scheduler's. Several verifiers can run; each session
lives on one at a time.
"""
