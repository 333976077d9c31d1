"""What the agent reports to coderd besides its lifecycle, one state machine per module.

* :mod:`~coderagent.reporting.activity`: what the SSH server tells (sessions
  started and ended, refusals), counted and passed to the connection log;
* :mod:`~coderagent.reporting.stats`: ``UpdateStats``, the report that keeps a
  workspace with a connected user from stopping;
* :mod:`~coderagent.reporting.connlog`: ``ReportConnection``, the audit FIFO;
* :mod:`~coderagent.reporting.metadata`: ``BatchUpdateMetadata``, the
  manifest's metadata scripts (run by :mod:`~coderagent.reporting.command`);
* :mod:`~coderagent.reporting.resources`: resource monitoring (memory and
  volumes, read by :mod:`~coderagent.reporting.usage`);
* :mod:`~coderagent.reporting.apphealth`: ``BatchUpdateAppHealths``.

Each is a service run as a child of the
:class:`~coderagent.coderd.client.CoderdClient`, so it is stopped before the
connection is; ``tap`` builds and wires them.  Time comes from an injected
clock and every queue has a bound.
"""
