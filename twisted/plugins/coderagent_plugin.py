"""twistd dropin: declares the coderagent service makers and nothing else.

Kept tiny on purpose: every twistd run imports this file to build its plugin
cache, so it must not import the reactor or any of coderagent's modules.
"""

from twisted.application.service import ServiceMaker

coderAgent = ServiceMaker(
    "Coder workspace agent",
    "coderagent.tap",
    "A Coder workspace agent: SSH server, forwarding policy, boundary audit logs.",
    "coder-agent",
)

coderdDev = ServiceMaker(
    "Development coderd",
    "coderagent.devcoderd.tap",
    "A development coderd: the agent API in memory, for the README run command and tests.",
    "coderd-dev",
)
