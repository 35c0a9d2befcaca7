"""Talking to the Kubernetes API server as the node: the kubeconfig, and a small client.

Only `nodekeeper.events` (when events are on) and `nodekeeper doctor` load the client;
`kubeconfig` is plain parsing and loads nothing else.
"""
