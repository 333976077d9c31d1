"""Channel windows and the per-connection window budget.

The window is what a peer may send us before we have forwarded it, so these
numbers bound what one client can make the agent buffer.  They live apart
from the connection so that channels (sessions, relays) can size themselves
without importing the connection that carries them.
"""

from __future__ import annotations

#: Channel window we advertise, like OpenSSH (64 packets of 32 KiB).  Conch's
#: 128 KiB default costs a round trip every 64 KiB of upload.
CHANNEL_WINDOW = 2 * 1024 * 1024
CHANNEL_MAX_PACKET = 32 * 1024

#: Window all of one connection's channels share once there are many: each
#: gets an even share, between MIN_CHANNEL_WINDOW and CHANNEL_WINDOW.  This
#: bounds what one client can make the agent buffer (200 channels at 2 MiB
#: would be 400 MiB).  It also keeps OpenSSH's client from reading that much
#: from its local sockets ahead of us, where its buffer growth (a realloc
#: and copy per 32 KiB read) costs more CPU than the transfer itself.
CONNECTION_WINDOW_BUDGET = 8 * 1024 * 1024
MIN_CHANNEL_WINDOW = 128 * 1024
