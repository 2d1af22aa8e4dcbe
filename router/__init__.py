"""The router: the fleet registry and the front door for clients.

``registry`` and ``policy`` (and ``failover``) are pure decision code; the
``watcher`` loops and the ``forwarder`` do the I/O around them; ``fleet``
ties instances to their channels; ``servicer`` is the thin gRPC adapter and
``main`` the composition root.
"""
