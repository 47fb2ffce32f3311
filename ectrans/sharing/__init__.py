"""Multi-process weight sharing: one weight holder per device and model, K executor processes
forked from a zygote that map its weights, and `SharedExecutorPool`, the `Executor` over them
(see docs/weight-sharing.md). Never imports redis."""
