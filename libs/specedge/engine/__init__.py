"""The speculative core: the part of SpecEdge that imports torch.

Only the GPU services (verifier, edge agent) and `specedge generate` import this package;
the gateway and scheduler never do. It owns model loading (`loading`) and, as the
speculative core lands, the model runner, draft trees and the acceptance rule.
"""
