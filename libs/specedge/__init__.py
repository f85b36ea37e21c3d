"""SpecEdge shared library.

Owns what every service shares: the `specedge` command line (`cli`), typed settings
helpers (`config`), every bus message (`protocol`) and subject name (`subjects`), the NATS
connection (`bus`), service presence on the bus (`registry`), the service lifecycle
(`service`), the embedded nats-server/redis-server launcher (`launcher`) and `specedge up`
(`up`). The torch part — model runner, draft trees, acceptance — lives in
`specedge.engine`, which only the GPU services (verifier, edge agent) import.
"""

__version__ = "0.1.0"
