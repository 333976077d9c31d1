"""coderagent: a Coder workspace agent built on Twisted Conch.

Each concept lives in its own sub-package: ``ssh`` (the SSH server), ``policy``
(what forwards and transfers are allowed), and later ``boundary``, ``coderd``
and ``observe``.  ``tap`` only wires them together for twistd.
"""

__version__ = "0.1.0"
