"""Running ECTrans on this machine: service processes (`launch`), private Redis servers and clusters
(`redis_server`, `redis_topology`) and the record of the stack `ectrans up` started (`stacks`).

Used by `ectrans up`, the CLI's stack lookup, the client (`stacks`, to find a local stack when no
URL is given), benchmarks and tests; no service imports it but the gateway, through the client.
"""
