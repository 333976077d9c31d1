from coderagent.pb import agent_pb2 as _agent_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BoundaryMessage(_message.Message):
    __slots__ = ("logs", "status")
    LOGS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    logs: _agent_pb2.ReportBoundaryLogsRequest
    status: BoundaryStatus
    def __init__(self, logs: _Optional[_Union[_agent_pb2.ReportBoundaryLogsRequest, _Mapping]] = ..., status: _Optional[_Union[BoundaryStatus, _Mapping]] = ...) -> None: ...

class BoundaryStatus(_message.Message):
    __slots__ = ("dropped_channel_full", "dropped_batch_full")
    DROPPED_CHANNEL_FULL_FIELD_NUMBER: _ClassVar[int]
    DROPPED_BATCH_FULL_FIELD_NUMBER: _ClassVar[int]
    dropped_channel_full: int
    dropped_batch_full: int
    def __init__(self, dropped_channel_full: _Optional[int] = ..., dropped_batch_full: _Optional[int] = ...) -> None: ...
