"""``coder-agent policy check FILE`` and ``coder-agent policy explain FILE --local db:5432 …``.

``check`` loads a policy file as the agent would and prints every error with its line (exit 1),
or ``ok`` and what the file holds (exit 0).  ``explain`` answers one question as the agent
would: the decision, and the rule (or default, flag, key option) that made it; for a host name
it resolves the name and decides for each address, as the agent does before it connects.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from coderagent.netaddr import resolve, splitHostPort
from coderagent.policy.engine import Decision, Policy, normalisePath
from coderagent.policy.keyoptions import KeyOptionError, KeyOptions, parseKeyOptions
from coderagent.policy.policyfile import PolicyFileError, loadPolicy
from coderagent.policy.rules import SECTIONS

Resolver = Callable[[str, int], Sequence[str]]


def addParser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``coder-agent policy …``, under the CLI's other commands."""
    parser = subparsers.add_parser("policy", help="check a forwarding policy file, or explain it")
    commands = parser.add_subparsers(dest="policyCommand", required=True)
    check = commands.add_parser("check", help="validate a policy file (exit 0 or 1)")
    check.add_argument("file")
    explain = commands.add_parser("explain", help="the decision for one request, and its rule")
    explain.add_argument("file")
    which = explain.add_mutually_exclusive_group(required=True)
    which.add_argument("--local", metavar="HOST:PORT", help="ssh -L to HOST:PORT")
    which.add_argument("--reverse", metavar="HOST:PORT", help="ssh -R listening on HOST:PORT")
    which.add_argument("--local-unix", metavar="PATH", help="ssh -L to a Unix socket")
    which.add_argument("--reverse-unix", metavar="PATH", help="ssh -R listening on a Unix socket")
    explain.add_argument(
        "--key", metavar="LINE", help="an authorized_keys line (or only its options) to apply"
    )


def run(args: argparse.Namespace, out: Callable[[str], None], resolver: Resolver = resolve) -> int:
    try:
        data = Path(args.file).read_bytes()
    except OSError as e:
        out(f"{args.file}: cannot read: {e.strerror}")
        return 1
    try:
        rules = loadPolicy(data)
    except PolicyFileError as e:
        for error in e.errors:
            out(f"{args.file}: {error}")
        return 1
    if args.policyCommand == "check":
        counts = ", ".join(
            f"{name}: {len(section.rules)} rules, default {section.default}"
            for name in SECTIONS
            if (section := rules.sections.get(name)) is not None
        )
        out(f"{args.file}: ok ({rules.mode}; {counts or 'no sections: everything allowed'})")
        return 0
    key: KeyOptions | None = None
    if args.key:
        try:
            key = parseKeyOptions(_optionsOf(args.key))
        except KeyOptionError as e:
            out(f"--key: refused: {e}")
            return 1
    policy = Policy(rules=rules)
    if args.local:
        return _local(policy, args.local, key, out, resolver)
    if args.reverse:
        host, port = splitHostPort(args.reverse)
        return _show(out, f"reverse tcp {args.reverse}", policy.reverseTCP(host, port, key))
    if args.local_unix:
        path = normalisePath(args.local_unix)
        return _show(out, f"local unix {path}", policy.localUnix(path, key))
    path = normalisePath(args.reverse_unix)
    return _show(out, f"reverse unix {path}", policy.reverseUnix(path, key))


def _local(
    policy: Policy,
    target: str,
    key: KeyOptions | None,
    out: Callable[[str], None],
    resolver: Resolver,
) -> int:
    host, port = splitHostPort(target)
    try:
        addresses = list(resolver(host, port))
    except OSError as e:
        out(f"local tcp {target}: {host} does not resolve ({e})")
        return 1
    result = policy.localTCP(host, port, addresses, key)
    out(f"local tcp {target}")
    for address in addresses:
        single = policy.localTCP(host, port, [address], key).decision
        out(f"  {address}: {_describe(single)}")
    return _show(out, "result", result.decision, result.addresses)


def _show(
    out: Callable[[str], None], what: str, decision: Decision, addresses: Sequence[str] = ()
) -> int:
    where = f" (would connect to {', '.join(addresses)})" if addresses else ""
    out(f"{what}: {_describe(decision)}{where}")
    return 0 if decision.allowed else 2


def _describe(decision: Decision) -> str:
    if decision.wouldRefuse:
        return f"allowed (audit mode; would be refused by {decision.rule!r})"
    if decision.allowed:
        return "allowed"
    return f"refused by {decision.rule!r}: {decision.reason}"


def _optionsOf(line: str) -> str:
    """The options of an authorized_keys line, or the text itself if it is only options."""
    from coderagent.ssh.auth import splitKeyLine

    options, _ = splitKeyLine(line.strip())
    return options


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="coder-agent")
    addParser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["policy", *argv])
    return run(args, lambda line: print(line, file=sys.stdout))
