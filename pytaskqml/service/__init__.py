"""A pipeline as a service (``service``): the gate that refuses new work while draining and
counts what is still to answer, its ingress and control ports.

May import: ``pipeline``, ``observe``, ``ingress``, ``wire`` and the front.
"""
