"""Small CiliumNetworkPolicy documents for tests, written out as operators would."""
from __future__ import annotations


def ingress_policy(name: str, app: str, peer: str, port: int, deny_port: int | None = None) -> str:
    """``app`` takes TCP ``port`` from ``peer`` (and, with ``deny_port``, is denied it)."""
    text = (f"apiVersion: cilium.io/v2\n"
            f"kind: CiliumNetworkPolicy\n"
            f"metadata: {{name: {name}}}\n"
            f"spec:\n"
            f"  endpointSelector: {{matchLabels: {{app: {app}}}}}\n"
            f"  ingress:\n"
            f"    - fromEndpoints: [{{matchLabels: {{app: {peer}}}}}]\n"
            f"      toPorts: [{{ports: [{{port: \"{port}\", protocol: TCP}}]}}]\n")
    if deny_port is not None:
        text += (f"  ingressDeny:\n"
                 f"    - fromEndpoints: [{{matchLabels: {{app: {peer}}}}}]\n"
                 f"      toPorts: [{{ports: [{{port: \"{deny_port}\", protocol: TCP}}]}}]\n")
    return text
