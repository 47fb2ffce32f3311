"""The monitor: memory, throughput, latency and queue depth of the node, in logs and Redis."""
