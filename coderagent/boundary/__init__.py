"""The boundary audit log proxy: socket, framing, spool, and forwarding to coderd.

``codec`` reads frames, ``server`` accepts writers on the Unix socket,
``spool`` keeps what coderd has not acknowledged on disk, and ``forwarder``
sends it with ReportBoundaryLogs, in order.
"""
