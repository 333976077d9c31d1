"""Generated protobuf modules for the Coder agent API.

- ``agent_pb2``: package ``coder.agent.v2`` (the ``Agent`` DRPC service and its messages).
- ``boundary_pb2``: package ``coder.boundarylogproxy.codec.v1`` (the boundary socket's
  TagV2 envelope).

Sources are ``proto/coderagent/pb/*.proto``; regenerate with ``scripts/gen-proto``.
Do not edit the ``*_pb2.py``/``*_pb2.pyi`` files by hand.
"""
