"""The router: the fleet registry and the front door for clients.

``registry`` and ``policy`` (and ``failover``) are pure decision code; the
``watcher`` loops and the ``forwarder`` do the I/O around them; ``upstreams``
ties instances to their channels and watchers; ``servicer`` is the thin gRPC adapter and
``main`` the composition root.
"""
