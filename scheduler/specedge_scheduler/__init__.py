"""SpecEdge scheduler: admission, verifier/edge assignment and verification batching.

Owns deciding who verifies and drafts for each session and when a batch goes to a
verifier. It never imports torch. Its policy is a pure, clock-injected class (no NATS,
no Redis), which the benchmarks' simulator drives too; this package wires that policy to
the bus (`main`).
"""
