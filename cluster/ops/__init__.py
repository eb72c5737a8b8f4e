"""Cluster operations: the local multi-node rehearsal (`raylm cluster`), KubeRay manifests, docs.

Nothing in the training, tuning or serving code imports this package.
"""
