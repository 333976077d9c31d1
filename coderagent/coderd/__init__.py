"""Talking to coderd: credentials now; the WebSocket/yamux/DRPC client plugs in here."""
