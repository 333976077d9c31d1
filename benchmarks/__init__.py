"""Side-by-side benchmarks: OpenSSH's ``sshd`` against the agent's SSH server.

Entry point: ``python benchmarks/run.py`` (or ``tox -e bench``); see README.md.

Modules:

- :mod:`.sampling`: CPU and RSS of a process tree, read from ``/proc``.
- :mod:`.servers`: start and stop ``sshd`` and ``twistd coder-agent`` on 127.0.0.1.
- :mod:`.workloads`: the sink, the pusher, and the tests themselves.
- :mod:`.report`: medians, ratios, targets, the printed tables.
"""
