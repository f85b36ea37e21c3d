"""SpecEdge edge agent: the daemon a user runs on their own GPU.

Owns the draft model on the user's machine: it connects *out* to NATS (no open port),
registers with its draft model and tokenizer fingerprint, heartbeats, reconnects forever
and drains on SIGTERM. Drafting for assigned sessions arrives with later issues. It needs
no Redis and no gateway or scheduler code, and installs on its own.
"""
