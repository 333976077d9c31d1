"""The ``coder.agent.v2.Agent`` service as a table: method path, request and response type.

Read from the generated descriptor rather than written by hand, so the DRPC
method names (``/coder.agent.v2.Agent/ReportBoundaryLogs``) and the message
types can only be what ``proto/`` says, on the client and on coderd-dev alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import message_factory
from google.protobuf.message import Message

from coderagent.pb import agent_pb2

#: The path coderd serves the agent API on, and the API version we ask for
#: (2.7 is the first with ReportBoundaryLogs; coderd 2.30+).
RPC_PATH = "/api/v2/workspaceagents/me/rpc"
API_VERSION = "2.7"

#: What coderd answers when the token is missing or wrong.
UNAUTHORIZED_MESSAGE = "Workspace agent not authorized."

_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["Agent"]


@dataclass(frozen=True)
class RPC:
    """One method of the Agent service."""

    name: str
    path: str
    request: type[Message]
    response: type[Message]


RPCS: dict[str, RPC] = {
    m.name: RPC(
        m.name,
        f"/{_SERVICE.full_name}/{m.name}",
        message_factory.GetMessageClass(m.input_type),
        message_factory.GetMessageClass(m.output_type),
    )
    for m in _SERVICE.methods
}
