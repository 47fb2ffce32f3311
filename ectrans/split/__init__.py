"""Split deployment (Neurosurgeon-style): the client runs a model's first units, the server the rest.

`choose` predicts the end-to-end latency of every split point from per-unit costs, the link and the
server's queue, and picks the fastest; `link` estimates the link passively from the client's traffic.
Pure arithmetic: nothing here imports torch or redis.
"""
