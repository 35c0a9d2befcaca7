"""Talking to the Kubernetes API server as the node: the kubeconfig, a small client, and
Events on pods (events: the queue; sink: where it posts, the one user of the client).

Only the sink (when events are on) and `nodekeeper doctor` load the client;
`kubeconfig` is plain parsing and loads nothing else.
"""
