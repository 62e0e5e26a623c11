"""What an operator sees: ``GET /metrics`` in the Prometheus text format (``metrics``), the
status page (``status.html``) and its ``GET /`` and ``GET /status`` routes with the history the
page draws (``dashboard``).

May import: ``pytaskqml.errors``, ``wire``, ``core`` (statistics records) and ``ingress``
(its statistics). A served pipeline is described by a ``Protocol`` in ``dashboard``.
"""
