"""SpecEdge gateway: the public, OpenAI-compatible HTTP API.

Owns HTTP: authentication, the chat template and tokenization, opening sessions and
streaming committed tokens back. It never imports torch. The public OpenAI schema lives
in its own module, apart from the internal bus messages.
"""
