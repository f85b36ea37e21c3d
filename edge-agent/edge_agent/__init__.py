"""SpecEdge edge agent: the daemon a user runs on their own GPU.

Owns the draft model on the user's machine: it connects *out* to NATS (no open port),
registers with its draft model and tokenizer fingerprint, heartbeats, reconnects forever,
drafts for the sessions the scheduler assigns it (with proactive drafting) and drains on
SIGTERM. It needs no Redis and no gateway or scheduler code, and installs on its own.
"""
