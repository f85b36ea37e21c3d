"""The speculative core: the part of SpecEdge that imports torch.

Only the GPU services (verifier, edge agent) and `specedge generate` import this package;
the gateway and scheduler never do. It owns model loading (`loading`), the batched tree
runner (`runner`), draft trees (`tree`), sampling and the acceptance rule (`sampling`,
`acceptance`), the drafter and verifier parties (`parties`) and the in-process modes
(`generate`). Its benchmarks live in the `specedge-bench` distribution (`bench/`).
"""
