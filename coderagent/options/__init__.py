"""The ``coder-agent`` command line: every option, its environment fallback, typed values.

Upstream's ``coder agent`` is configured mostly through ``CODER_AGENT_*``
variables that a workspace template sets, so the environment matters as much
as the command line here.  The option table is written once, as data
(:data:`OPTIONS`); Twisted's ``optFlags``/``optParameters``, the environment
fallback, the help text and the validation are all derived from it, so an
option cannot exist in one place and be forgotten in another.

Precedence is upstream's: command line, then environment, then default.  As in
upstream's CLI library (serpent), an environment variable set to the empty
string counts as unset, so ``CODER_AGENT_X=`` never overrides a default.

Parsing keeps each option's raw text and where it came from; ``postOptions``
coerces everything at once.  A bad value stops the agent with exactly one line
naming the flag or the variable it came from, because that is the line an
operator reads in a workspace's start-up log.  twistd would print its whole
help before a ``UsageError``, burying that line, so validation errors leave as
``SystemExit("coder-agent: ...")`` instead.
"""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from twisted.python import usage

from coderagent.options.table import (
    DEFAULT_SOCKET_PATH,
    HOST_KEY_SUBDIR,
    IGNORED_OPTIONS,
    OPTIONS,
    SPECS,
    SPOOL_SUBDIR,
    OptionSpec,
)
from coderagent.options.values import AUTH_TYPES, ConfigError, Kind, parseDuration

__all__ = [
    "AUTH_TYPES",
    "DEFAULT_SOCKET_PATH",
    "IGNORED_OPTIONS",
    "OPTIONS",
    "ConfigError",
    "Kind",
    "OptionSpec",
    "Options",
    "parseDuration",
]




COMMAND_LINE = "command line"
_EMPTY = '""'

DEFAULT = "default"


def _helpNotes(spec: OptionSpec) -> list[str]:
    """``[env: ...]`` and ``[default: ...]``; a secret's default is never shown."""
    notes = [f"[env: {spec.env}]"]
    if not spec.secret:
        shown = spec.helpDefault if spec.helpDefault is not None else spec.default
        notes.append(f"[default: {shown or _EMPTY}]")
    return notes


def _helpText(spec: OptionSpec) -> str:
    """The help line: what it does, then where else it can be set and its default."""
    return " ".join([spec.help, *_helpNotes(spec)])


@dataclass(frozen=True)
class _Raw:
    """An option's text(s) before parsing and where they came from.

    ``texts`` holds one entry, except for a repeatable option given several
    times on the command line.
    """

    texts: tuple[str, ...]
    source: str
    where: str


class Options(usage.Options):
    """Options of ``twistd coder-agent``; after parsing, ``self[name]`` is typed.

    Keys are the long flag names.  ``environ`` defaults to ``os.environ`` and
    exists so tests (and embedding code) can pass their own mapping.
    """

    synopsis = "[options]"
    longdesc = (
        "Run a Coder workspace agent: an SSH server for this workspace, configured like "
        "upstream's `coder agent`. Each option can also be set through the environment "
        "variable shown with it; the command line wins over the environment, which wins "
        "over the default. Booleans are written --flag, --flag=true or --flag=false on the "
        "command line and true, false, 1, 0, yes or no in the environment. Durations use "
        "Go's syntax: 72h, 1h30m, 1.5s, 500ms."
    )

    # Twisted reads these two class attributes; the repeatable option is
    # missing from both because Twisted keeps only the last value of a
    # parameter, so it gets an ``opt_`` method instead (added below the class).
    optFlags: ClassVar[list[list[str | None]]] = [
        [spec.name, None, _helpText(spec)] for spec in OPTIONS if spec.kind.flag
    ]
    optParameters: ClassVar[list[list[str | None]]] = [
        # The default stays None so that "given on the command line" is
        # visible after getopt, and so that Twisted adds no second default.
        [spec.name, None, None, _helpText(spec)]
        for spec in OPTIONS
        if not spec.kind.flag and not spec.kind.repeatable
    ]

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self._environ: dict[str, str] = dict(os.environ if environ is None else environ)
        self._repeated: dict[str, list[str]] = {}
        self._booleanAssignments: dict[str, str] = {}
        self._commandLine: dict[str, tuple[str, ...]] | None = None
        self._sources: dict[str, str] = {}

    # --- command line -----------------------------------------------------

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """Take ``--<boolean>=<value>`` ourselves, then let Twisted parse the rest.

        Go CLIs accept ``--flag=false``, and templates use it to switch off a
        flag that the environment switched on.  getopt would reject an
        argument to a flag, so those items are removed before it runs.
        """
        arguments = list(sys.argv[1:] if options is None else options)
        super().parseOptions(self._takeBooleanAssignments(arguments))

    def _takeBooleanAssignments(self, arguments: list[str]) -> list[str]:
        """Remove ``--<boolean>=<value>`` items, remembering the last value of each.

        Scanning follows getopt: it stops at ``--`` or at the first operand,
        and skips the value of a parameter written as two items, so a value
        that happens to look like ``--block-file-transfer=x`` is left alone.
        As with pflag, the last occurrence wins, so a bare ``--flag`` after
        ``--flag=false`` turns the flag back on.
        """
        rest: list[str] = []
        assigned: dict[str, tuple[int, str]] = {}
        lastBare: dict[str, int] = {}
        index = 0
        while index < len(arguments):
            argument = arguments[index]
            if argument in ("--", "-") or not argument.startswith("-"):
                rest.extend(arguments[index:])
                break
            if not argument.startswith("--"):
                # Short options: we define none; getopt reports them.
                rest.append(argument)
                index += 1
                continue
            name, equals, value = argument[2:].partition("=")
            spec = SPECS.get(name)
            if spec is not None and spec.kind.flag:
                if equals:
                    assigned[name] = (index, value)
                    index += 1
                    continue
                lastBare[name] = index
            rest.append(argument)
            if not equals and self._takesValue(name):
                rest.extend(arguments[index + 1 : index + 2])
                index += 1
            index += 1
        self._booleanAssignments = {
            name: value
            for name, (position, value) in assigned.items()
            if position > lastBare.get(name, -1)
        }
        return rest

    def _takesValue(self, name: str) -> bool:
        """Whether getopt will read the next item as this long option's value.

        getopt accepts any unambiguous prefix of a long option, so prefixes
        are resolved the same way here.
        """
        if name in self.longOpt:
            return False
        if name + "=" in self.longOpt:
            return True
        candidates = [option for option in self.longOpt if option.startswith(name)]
        return len(candidates) == 1 and candidates[0].endswith("=")

    def _collect(self, name: str, value: str) -> None:
        """Keep every occurrence of a repeatable option, in order."""
        self._repeated.setdefault(name, []).append(value)

    def _commandLineTexts(self) -> dict[str, tuple[str, ...]]:
        """What the command line said, as raw text, for the options it set.

        Once validation has replaced the raw values with typed ones, the
        snapshot taken then is returned instead, so validating twice (or
        asking :meth:`sourceOf` afterwards) still sees the command line.
        """
        if self._commandLine is not None:
            return self._commandLine
        given: dict[str, tuple[str, ...]] = {}
        for spec in OPTIONS:
            if spec.kind.repeatable:
                if spec.name in self._repeated:
                    given[spec.name] = tuple(self._repeated[spec.name])
            elif spec.kind.flag:
                if spec.name in self._booleanAssignments:
                    given[spec.name] = (self._booleanAssignments[spec.name],)
                elif self.get(spec.name):
                    given[spec.name] = ("true",)
            elif self.get(spec.name) is not None:
                given[spec.name] = (str(self[spec.name]),)
        return given

    # --- resolution ---------------------------------------------------------

    def _raw(self, spec: OptionSpec, commandLine: Mapping[str, tuple[str, ...]]) -> _Raw:
        """Pick the text that wins for one option: command line, environment, default."""
        if spec.name in commandLine:
            return _Raw(commandLine[spec.name], COMMAND_LINE, f"--{spec.name}")
        value = self._environ.get(spec.env, "")
        if value != "":
            return _Raw((value,), f"environment ({spec.env})", spec.env)
        return _Raw((spec.default,), DEFAULT, f"default of --{spec.name}")

    def validate(self) -> None:
        """Turn every option's winning text into its typed value, or raise ConfigError.

        This is the whole of the checking, kept apart from ``postOptions`` so
        tests can read the message without going through ``SystemExit``.  The
        first bad value wins; one line is what the operator will act on.
        """
        commandLine = self._commandLineTexts()
        typed: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for spec in OPTIONS:
            raw = self._raw(spec, commandLine)
            try:
                if spec.kind.repeatable:
                    typed[spec.name] = [
                        item for text in raw.texts for item in spec.kind.parse(text)
                    ]
                else:
                    typed[spec.name] = spec.kind.parse(raw.texts[-1])
            except ValueError as e:
                problem = "invalid value (not shown)" if spec.secret else str(e)
                raise ConfigError(raw.where, problem) from None
            sources[spec.name] = raw.source
        if not typed["ssh-host-key-dir"]:
            typed["ssh-host-key-dir"] = os.path.join(typed["script-data-dir"], HOST_KEY_SUBDIR)
        if not typed["boundary-log-spool-dir"]:
            typed["boundary-log-spool-dir"] = os.path.join(typed["script-data-dir"], SPOOL_SUBDIR)
        self._commandLine = commandLine
        self._sources = sources
        self.update(typed)

    def postOptions(self) -> None:
        """Validate, and leave with one line and status 1 on a bad value.

        twistd prints the entire help before the message of a ``UsageError``;
        a ``SystemExit`` with a string prints just that string on stderr.
        """
        try:
            self.validate()
        except ConfigError as e:
            raise SystemExit(f"coder-agent: {e}") from None

    # --- questions the service asks ----------------------------------------------

    def sourceOf(self, name: str) -> str:
        """Where ``name``'s value came from, for start-up logs and error reports.

        One of ``"command line"``, ``"environment (CODER_AGENT_X)"`` or
        ``"default"``.
        """
        spec = SPECS.get(name)
        if spec is None:
            raise KeyError(f"no such option: {name}")
        if name in self._sources:
            return self._sources[name]
        return self._raw(spec, self._commandLineTexts()).source

    def ignoredOptionsInUse(self) -> list[str]:
        """The ignored options someone set, so the agent can say once that they do nothing.

        An option counts when it was given at all (command line or
        environment), even to its default value: whoever set it expected an
        effect.
        """
        inUse = []
        for name in IGNORED_OPTIONS:
            spec = SPECS[name]
            if self.sourceOf(name) != DEFAULT:
                inUse.append(name)
            elif self._sources and self[name] != spec.kind.parse(spec.default):
                # Only meaningful once validated: before that, self[name]
                # holds Twisted's raw placeholder, not a typed value.
                inUse.append(name)
        return inUse

    # --- presentation -------------------------------------------------------

    def getUsage(self, width: int | None = None) -> str:
        """List the options in table order, each with its env variable and default.

        Twisted's two-column layout leaves under 30 columns for the text next
        to ``--devcontainers-discovery-autostart-enable`` and breaks the long
        variable names in pieces; here the text goes under the flag, and words
        are never broken, so every name can be found (and copied) whole.  The
        same words are in ``self.docs``, which Twisted's shell completion reads.
        """
        if not width:
            width = int(os.environ.get("COLUMNS", "80"))
        width = max(width, 40)
        wrap = textwrap.TextWrapper(
            width=width,
            initial_indent=" " * 6,
            subsequent_indent=" " * 6,
            break_long_words=False,
            break_on_hyphens=False,
        )
        lines = ["Options:"]
        described: set[str] = set()
        for spec in OPTIONS:
            if spec.kind.flag:
                head = f"--{spec.name}[=true|false]"
            else:
                head = f"--{spec.name}={spec.kind.metavar}"
            lines.append("  " + head)
            lines.extend(wrap.wrap(spec.help))
            # The notes go on a line of their own so that "[env:" and the
            # variable name are never separated by a line break.
            notes = " ".join(_helpNotes(spec))
            if len(wrap.initial_indent + notes) <= width:
                lines.append(wrap.initial_indent + notes)
            else:
                lines.extend(wrap.initial_indent + note for note in _helpNotes(spec))
            described.add(spec.name)
        for option in self.longOpt:
            name = option.rstrip("=")
            if name in described:
                continue
            described.add(name)
            lines.append(f"  --{option}")
            lines.extend(wrap.wrap(" ".join((self.docs.get(name) or "").split())))
        usage_ = "\n".join(lines) + "\n"
        longdesc = "\n".join(textwrap.wrap(self.longdesc, width))
        return f"{usage_}\n{longdesc}\n"

    def __repr__(self) -> str:
        """Like a dict's, with secrets hidden, in case options end up in a log."""
        shown = {
            key: "<hidden>" if key in SPECS and SPECS[key].secret and value else value
            for key, value in self.items()
        }
        return f"{type(self).__name__}({shown!r})"


def _collector(spec: OptionSpec) -> Callable[[Options, str], None]:
    """Build the ``opt_`` method Twisted dispatches a repeatable option to."""

    def collect(self: Options, value: str) -> None:
        self._collect(spec.name, value)

    collect.__doc__ = _helpText(spec)
    collect.__name__ = "opt_" + spec.name.replace("-", "_")
    return collect


for _spec in OPTIONS:
    if _spec.kind.repeatable:
        setattr(Options, "opt_" + _spec.name.replace("-", "_"), _collector(_spec))
del _spec
