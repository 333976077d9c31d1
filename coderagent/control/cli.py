"""``coder-agent``: ask a running agent over its control socket, or check a policy file.

    coder-agent status [--socket PATH]       # prints the agent's status as JSON
    coder-agent ping [--socket PATH]
    coder-agent policy check FILE            # see coderagent.policy.explain
    coder-agent policy explain FILE --local HOST:PORT | --reverse HOST:PORT
                                    | --local-unix PATH | --reverse-unix PATH [--key LINE]

The socket is ``--socket-path`` of the agent (``$CODER_AGENT_SOCKET_PATH``),
by default ``$TMPDIR/coder-agent.sock``; the agent serves it when started
with ``--socket-server-enabled``.  Exit status 0 on an answer, 1 if no agent
answers (or what answers is not JSON, or is an ``{"error": …}``, or says the
agent is ``unhealthy``: not serving SSH).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys

from coderagent.options import DEFAULT_SOCKET_PATH
from coderagent.policy import explain


def ask(path: str, command: str, timeout: float = 10.0) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(command.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    answer: dict[str, object] = json.loads(data)
    return answer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="coder-agent", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("status", "ping"):
        asking = commands.add_parser(name, help=f"{name} the running agent")
        asking.add_argument(
            "--socket",
            default=os.environ.get("CODER_AGENT_SOCKET_PATH") or DEFAULT_SOCKET_PATH,
            help="the agent's control socket [$CODER_AGENT_SOCKET_PATH]",
        )
    explain.addParser(commands)
    args = parser.parse_args(argv)
    if args.command == "policy":
        return explain.run(args, print)
    try:
        answer = ask(args.socket, args.command)
    except (OSError, ValueError) as e:
        print(f"coder-agent: no agent answered on {args.socket}: {e}", file=sys.stderr)
        return 1
    json.dump(answer, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0 if "error" not in answer and answer.get("status", "ok") == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
