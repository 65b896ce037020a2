"""Kubernetes targets: what modeldeck applies to a cluster (manifests.py) and how it talks to one
(cluster.py, with the optional `kubernetes` client, imported only when a cluster is used)."""
