"""The worker: pulls admitted tasks, batches them and runs them on the device."""
