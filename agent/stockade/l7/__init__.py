"""L7 (HTTP) enforcement: the host's transparent proxy (HAProxy), its configuration and
maps, the host routing that reaches it, its supervision and its request log.

    rules.py    HTTP rules -> the proxy's regular expressions (pure)
    haproxy.py  configuration text, map files, the runtime API
    host.py     nft TPROXY table and the policy route of steered packets
    proxy.py    the manager: desired state from the agent, the process, status
    logs.py     the proxy's request log -> L7 flow records
"""
