"""``--debug-address`` and ``--pprof-address``: looking inside a running agent.

The debug server answers, as JSON unless noted:

* ``/health``: the status sections (coderd connection and reports, SSH,
  boundary proxy); 503 instead of 200 while the agent is unhealthy (not
  serving SSH);
* ``/manifest``: the manifest coderd sent, with secret values redacted;
* ``/ssh``: every live SSH connection: peer, user, channels, forwards;
* ``/logs``: the most recent log lines (text).

The profiling server is Go's ``net/http/pprof`` in Python's terms:

* ``/debug/pprof/threads``: the stack of every thread (text);
* ``/debug/pprof/profile?seconds=N``: a cProfile of the reactor thread for N
  seconds (default 5, at most 60), as pstats text sorted by cumulative time.

Both render in the reactor thread.  The profiler shows code and timing, so it
serves loopback addresses only, whatever ``--pprof-address`` says.
"""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import re
import sys
import threading
import traceback
from typing import Any

from google.protobuf import json_format
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from coderagent.observe.logs import RecentLines
from coderagent.observe.status import OK, AgentStatus

REDACTED = "<redacted>"
#: Manifest environment variables whose value is not shown.
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|KEY|AUTH", re.I)

MAX_PROFILE_SECONDS = 60.0


def _json(request: Any, value: Any, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def _text(request: Any, text: str) -> bytes:
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    request.setHeader(b"Cache-Control", b"no-store")
    return text.encode("utf-8", "replace")


class _Leaf(Resource):
    isLeaf = True


def redactedManifest(manifest: Any) -> dict[str, Any]:
    """The manifest as JSON, with secret values and secret-looking variables hidden."""
    data: dict[str, Any] = json_format.MessageToDict(manifest, preserving_proto_field_name=True)
    for secret in data.get("secrets", []):
        if "value" in secret:
            secret["value"] = REDACTED
    env = data.get("environment_variables", {})
    for name in env:
        if _SECRET_NAME.search(name):
            env[name] = REDACTED
    return data


class _Health(_Leaf):
    def __init__(self, status: AgentStatus) -> None:
        super().__init__()
        self.status = status

    def render_GET(self, request: Any) -> bytes:
        report = self.status.report()
        return _json(request, report, 200 if report["status"] == OK else 503)


class _Manifest(_Leaf):
    def __init__(self, manifest: Any) -> None:
        super().__init__()
        self.manifest = manifest

    def render_GET(self, request: Any) -> bytes:
        manifest = self.manifest()
        if manifest is None:
            return _json(request, {"error": "no manifest from coderd yet"}, 404)
        return _json(request, redactedManifest(manifest))


class _SSH(_Leaf):
    def __init__(self, connections: Any) -> None:
        super().__init__()
        self.connections = connections

    def render_GET(self, request: Any) -> bytes:
        return _json(request, {"connections": self.connections()})


class _Logs(_Leaf):
    def __init__(self, recent: RecentLines) -> None:
        super().__init__()
        self.recent = recent

    def render_GET(self, request: Any) -> bytes:
        return _text(request, "".join(self.recent.lines))


class _Index(Resource):
    def __init__(self, paths: list[str]) -> None:
        super().__init__()
        self.paths = paths

    def getChild(self, path: bytes, request: Any) -> Resource:
        return self if path == b"" else super().getChild(path, request)

    def render_GET(self, request: Any) -> bytes:
        return _text(request, "".join(f"{p}\n" for p in self.paths))


def debugSite(
    *, status: AgentStatus, manifest: Any, connections: Any, recent: RecentLines
) -> Site:
    """The debug server: ``manifest()`` and ``connections()`` are read at each request."""
    root = _Index(["/health", "/manifest", "/ssh", "/logs"])
    root.putChild(b"health", _Health(status))
    root.putChild(b"manifest", _Manifest(manifest))
    root.putChild(b"ssh", _SSH(connections))
    root.putChild(b"logs", _Logs(recent))
    return _site(root)


# -- profiling -------------------------------------------------------------------------


def threadStacks() -> str:
    """Every thread's stack, innermost call last, as Go's goroutine dump reads."""
    names = {t.ident: t.name for t in threading.enumerate()}
    out = []
    for ident, frame in sys._current_frames().items():
        out.append(f"thread {names.get(ident, '?')} ({ident}):\n")
        out.extend(traceback.format_stack(frame))
        out.append("\n")
    return "".join(out)


class _Threads(_Leaf):
    def render_GET(self, request: Any) -> bytes:
        return _text(request, threadStacks())


class _Profile(_Leaf):
    """A cProfile of the reactor thread: started now, reported after ``seconds``."""

    def __init__(self, clock: IReactorTime) -> None:
        super().__init__()
        self.clock = clock
        self.running = False

    def render_GET(self, request: Any) -> Any:
        try:
            seconds = float(request.args.get(b"seconds", [b"5"])[0])
        except ValueError:
            return _json(request, {"error": "seconds must be a number"}, 400)
        if not 0 < seconds <= MAX_PROFILE_SECONDS:
            problem = f"seconds must be in (0, {MAX_PROFILE_SECONDS:g}]"
            return _json(request, {"error": problem}, 400)
        if self.running:
            return _json(request, {"error": "a profile is already being taken"}, 409)
        self.running = True
        profiler = cProfile.Profile()
        profiler.enable()  # this thread only: the reactor's
        call = self.clock.callLater(seconds, self._finish, request, profiler, seconds)
        request.notifyFinish().addErrback(lambda _: self._abandon(call, profiler))
        return NOT_DONE_YET

    def _abandon(self, call: Any, profiler: cProfile.Profile) -> None:
        if call.active():
            call.cancel()
            profiler.disable()
            self.running = False

    def _finish(self, request: Any, profiler: cProfile.Profile, seconds: float) -> None:
        profiler.disable()
        self.running = False
        out = io.StringIO()
        out.write(f"cProfile of the reactor thread for {seconds:g}s\n\n")
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(60)
        request.write(_text(request, out.getvalue()))
        request.finish()


def profilingSite(clock: IReactorTime) -> Site:
    root = _Index(["/debug/pprof/threads", "/debug/pprof/profile?seconds=5"])
    debug, pprof = Resource(), Resource()
    root.putChild(b"debug", debug)
    debug.putChild(b"pprof", pprof)
    pprof.putChild(b"threads", _Threads())
    pprof.putChild(b"profile", _Profile(clock))
    return _site(root)


def _site(root: Resource) -> Site:
    site = Site(root)
    site.noisy = False
    site.displayTracebacks = False
    return site
