"""coderd-dev's workspace: who the agent is, and the manifest coderd serves it.

Read from the ``--manifest`` JSON file: unknown keys and wrong types are
errors, never ignored, so a typo in a test's or a person's manifest shows.
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from coderagent.pb import agent_pb2


class ManifestError(ValueError):
    """The ``--manifest`` file cannot be used; the message says why."""


@dataclass
class Workspace:
    """Who the agent is, as coderd knows it: the manifest and the template ids."""

    agentID: uuid.UUID = field(default_factory=uuid.uuid4)
    agentName: str = "main"
    workspaceID: uuid.UUID = field(default_factory=uuid.uuid4)
    workspaceName: str = "dev"
    ownerUsername: str = "developer"
    templateID: uuid.UUID = field(default_factory=uuid.uuid4)
    templateVersionID: uuid.UUID = field(default_factory=uuid.uuid4)
    directory: str = ""
    environmentVariables: dict[str, str] = field(default_factory=dict)
    motdPath: str = ""
    vsCodePortProxyURI: str = ""
    banners: list[str] = field(default_factory=list)
    scripts: list[agent_pb2.WorkspaceAgentScript] = field(default_factory=list)
    apps: list[agent_pb2.WorkspaceApp] = field(default_factory=list)
    metadata: list[agent_pb2.WorkspaceAgentMetadata.Description] = field(default_factory=list)

    _UUIDS = {
        "agent_id": "agentID",
        "workspace_id": "workspaceID",
        "template_id": "templateID",
        "template_version_id": "templateVersionID",
    }
    _TEXTS = {
        "agent_name": "agentName",
        "workspace_name": "workspaceName",
        "owner_username": "ownerUsername",
        "directory": "directory",
        "motd_path": "motdPath",
        "vs_code_port_proxy_uri": "vsCodePortProxyURI",
    }
    #: Lists of protobuf messages, written in protobuf's JSON form (durations as
    #: ``"5s"``) except that ids are UUID strings (made up when absent).
    _MESSAGES = {
        "scripts": ("scripts", agent_pb2.WorkspaceAgentScript, ("id", "log_source_id")),
        "apps": ("apps", agent_pb2.WorkspaceApp, ("id",)),
        "metadata": ("metadata", agent_pb2.WorkspaceAgentMetadata.Description, ()),
    }

    @classmethod
    def fromJSON(cls, text: str, where: str) -> Workspace:
        """Read a manifest file; unknown keys and wrong types are errors, not ignored."""
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ManifestError(f"{where}: not JSON: {e}") from e
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: expected a JSON object")
        workspace = cls()
        for key, value in data.items():
            if key in cls._UUIDS:
                try:
                    setattr(workspace, cls._UUIDS[key], uuid.UUID(str(value)))
                except ValueError as e:
                    raise ManifestError(f"{where}: {key}: not a UUID: {value!r}") from e
            elif key in cls._TEXTS:
                if not isinstance(value, str):
                    raise ManifestError(f"{where}: {key}: expected a string")
                setattr(workspace, cls._TEXTS[key], value)
            elif key == "environment_variables":
                if not isinstance(value, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in value.items()
                ):
                    raise ManifestError(f"{where}: {key}: expected an object of strings")
                workspace.environmentVariables = dict(value)
            elif key in cls._MESSAGES:
                attribute, kind, ids = cls._MESSAGES[key]
                setattr(workspace, attribute, _messages(where, key, value, kind, ids))
            elif key == "banners":
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ManifestError(f"{where}: {key}: expected a list of strings")
                workspace.banners = list(value)
            else:
                known = sorted(
                    [*cls._UUIDS, *cls._TEXTS, *cls._MESSAGES, "environment_variables", "banners"]
                )
                raise ManifestError(f"{where}: unknown key {key!r} (known: {', '.join(known)})")
        return workspace

    def manifest(self) -> agent_pb2.Manifest:
        return agent_pb2.Manifest(
            agent_id=self.agentID.bytes,
            agent_name=self.agentName,
            workspace_id=self.workspaceID.bytes,
            workspace_name=self.workspaceName,
            owner_username=self.ownerUsername,
            directory=self.directory,
            environment_variables=self.environmentVariables,
            motd_path=self.motdPath,
            vs_code_port_proxy_uri=self.vsCodePortProxyURI,
            scripts=self.scripts,
            apps=self.apps,
            metadata=self.metadata,
        )


# -- coderd's log format (cdr.dev/slog, human sink) -----------------------------------


def _messages(
    where: str, key: str, value: Any, kind: type[Message], ids: tuple[str, ...]
) -> list[Any]:
    """A JSON list of ``kind`` messages (``ids``: UUID strings here, bytes in protobuf)."""
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ManifestError(f"{where}: {key}: expected a list of objects")
    out = []
    for i, item in enumerate(value):
        item = dict(item)
        for name in ids:
            text = item.get(name) or str(uuid.uuid4())
            try:
                item[name] = base64.b64encode(uuid.UUID(str(text)).bytes).decode()
            except ValueError as e:
                raise ManifestError(f"{where}: {key}[{i}].{name}: not a UUID: {text!r}") from e
        try:
            out.append(json_format.ParseDict(item, kind()))
        except json_format.ParseError as e:
            raise ManifestError(f"{where}: {key}[{i}]: {e}") from e
    return out
