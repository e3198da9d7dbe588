"""Stands for qapi/qmp-registry.c and qapi/qmp-dispatch.c (with hmp-commands.hx): the one
command table that QMP and HMP share.

A ``Command`` is one row: its QMP name (``query-status``), its HMP name (``info status``) if
HMP has it, its arguments, the function that does the work and returns QMP's data, and the
HMP formatter that turns that data into the text ``info status`` prints (``hmp_fn``, when
set, is HMP's own function that shows more than QMP returns, as QEMU's hmp_* wrap qmp_*).
A command only one side has leaves the other out, as ``xp`` (HMP only) or
``query-commands`` (QMP only) do in QEMU. ``qmp_dispatch`` checks a QMP request's
arguments against the row, with QEMU's error texts; ``hmp_bind`` maps an HMP line's
words onto the same arguments.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

QMP_TYPES = {"str": (str, "string"), "int": (int, "integer"), "bool": (bool, "boolean"),
             "list": (list, "array")}


class MonitorError(Exception):
    """A command failed; ``cls`` is QMP's error class (GenericError, CommandNotFound...)."""

    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.cls = cls


@dataclass(frozen=True)
class Arg:
    """One argument. ``type``: str, int, bool, list; HMP-only kinds: ``fmt`` (``/4xg``),
    ``rest`` (the rest of the line). ``hmp_prefix``: in HMP the word is taken only if it
    starts with this (else ``hmp_default``), so an optional word may precede a required one."""

    name: str
    type: str = "str"
    optional: bool = False
    hmp_prefix: str | None = None
    hmp_default: Any = None


@dataclass
class Command:
    name: str
    fn: Callable[..., Any]
    hmp: str | None = None
    qmp: bool = True
    args: tuple[Arg, ...] = ()
    params: str = ""
    help: str = ""
    human: Callable[[Any], str] | None = None
    hmp_fn: Callable[..., Any] | None = None
    allow_oob: bool = False


@dataclass
class CommandTable:
    """The commands of one process, by QMP name and by HMP name."""

    by_name: dict[str, Command] = field(default_factory=dict)
    by_hmp: dict[str, Command] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def register(self, cmd: Command) -> None:
        self.by_name[cmd.name] = cmd
        if cmd.hmp is not None:
            self.by_hmp[cmd.hmp] = cmd

    def qmp_find_command(self, name: str) -> Command | None:
        cmd = self.by_name.get(name)
        return cmd if cmd is not None and cmd.qmp else None

    def hmp_commands(self) -> list[Command]:
        return sorted((c for c in self.by_hmp.values()), key=lambda c: c.hmp or "")

    def hmp_lookup(self, line: str) -> tuple[Command, list[str]]:
        """The HMP command a line names, and its argument words."""
        try:
            words = shlex.split(line)
        except ValueError as e:
            raise MonitorError(str(e), "InvalidParameter") from None
        if not words:
            raise MonitorError("empty command", "CommandNotFound")
        head = self.aliases.get(words[0], words[0])
        if head == "info":
            if len(words) < 2:
                return self.by_hmp["help"], ["info"]
            name, rest = f"info {words[1]}", words[2:]
        else:
            name, rest = head, words[1:]
        cmd = self.by_hmp.get(name)
        if cmd is None:
            raise MonitorError(f"unknown command: '{name}'", "CommandNotFound")
        return cmd, rest


def parse_int(text: str, what: str = "number") -> int:
    """An integer as HMP takes it: decimal, 0x hex, and + / - between terms."""
    expr = text.replace("-", "+-")
    try:
        return sum(int(term, 0) for term in expr.split("+") if term)
    except ValueError:
        raise MonitorError(f"invalid {what}: {text!r}", "InvalidParameter") from None


def hmp_bind(cmd: Command, words: list[str]) -> dict[str, Any]:
    """monitor_parse_arguments: an HMP line's words as the command's named arguments."""
    out: dict[str, Any] = {}
    i = 0
    for a in cmd.args:
        word = words[i] if i < len(words) else None
        if a.type == "rest":
            if word is not None:
                out[a.name] = " ".join(words[i:])
                i = len(words)
            continue
        if a.hmp_prefix is not None and (word is None or not word.startswith(a.hmp_prefix)):
            if a.hmp_default is not None:
                out[a.name] = a.hmp_default
            continue
        if word is None:
            if a.optional:
                continue
            raise MonitorError(f"Parameter '{a.name}' is missing", "InvalidParameter")
        if a.type == "int":
            out[a.name] = parse_int(word, a.name)
        elif a.type == "bool":
            if word not in ("on", "off"):
                raise MonitorError(f"{a.name}: expected 'on' or 'off'", "InvalidParameter")
            out[a.name] = word == "on"
        else:
            out[a.name] = word
        i += 1
    if i < len(words):
        raise MonitorError(f"{cmd.hmp}: extraneous characters at the end of line",
                           "InvalidParameter")
    return out


def qmp_check_arguments(cmd: Command, args: Any) -> dict[str, Any]:
    """The QObject input visitor's checks: every argument known, present and of its type."""
    if not isinstance(args, dict):
        raise MonitorError("QMP input member 'arguments' must be an object")
    known = {a.name: a for a in cmd.args}
    for name in args:
        if name not in known:
            raise MonitorError(f"Parameter '{name}' is unexpected")
    for a in cmd.args:
        if a.name not in args:
            if not a.optional:
                raise MonitorError(f"Parameter '{a.name}' is missing")
            continue
        want, label = QMP_TYPES.get(a.type, (str, "string"))
        v = args[a.name]
        if not isinstance(v, want) or (want is int and isinstance(v, bool)):
            raise MonitorError(f"Invalid parameter type for '{a.name}', expected: {label}")
    return args


def qmp_error_response(e: MonitorError, req_id: Any = None, has_id: bool = False) -> dict:
    rsp: dict[str, Any] = {"error": {"class": e.cls, "desc": e.desc}}
    if has_id:
        rsp["id"] = req_id
    return rsp


def qmp_dispatch_check_obj(req: Any, allow_oob: bool) -> tuple[str, bool]:
    """The request's shape: a JSON object with ``execute`` (or ``exec-oob``), ``arguments``
    and ``id``; returns the command name and whether it asks to run out of band."""
    if not isinstance(req, dict):
        raise MonitorError("QMP input must be a JSON object")
    command = None
    oob = False
    for key, value in req.items():
        if key == "execute" or (key == "exec-oob" and allow_oob):
            if not isinstance(value, str):
                raise MonitorError(f"QMP input member '{key}' must be a string")
            if command is not None:
                raise MonitorError("QMP input member 'exec-oob' clashes with 'execute'")
            command, oob = value, key == "exec-oob"
        elif key == "arguments":
            if not isinstance(value, dict):
                raise MonitorError("QMP input member 'arguments' must be an object")
        elif key != "id":
            raise MonitorError(f"QMP input member '{key}' is unexpected")
    if command is None:
        raise MonitorError("QMP input lacks member 'execute'")
    return command, oob


def qmp_dispatch(table: CommandTable, req: Any, allow_oob: bool) -> dict:
    """One QMP request to its response: ``{"return": ...}`` or ``{"error": ...}``, with the
    request's ``id``."""
    has_id = isinstance(req, dict) and "id" in req
    req_id = req.get("id") if has_id else None
    try:
        name, oob = qmp_dispatch_check_obj(req, allow_oob)
        cmd = table.qmp_find_command(name)
        if cmd is None:
            raise MonitorError(f"The command {name} has not been found", "CommandNotFound")
        if oob and not cmd.allow_oob:
            raise MonitorError(f"The command {name} does not support OOB")
        args = qmp_check_arguments(cmd, req.get("arguments", {}))
        ret = cmd.fn(**args)
    except MonitorError as e:
        return qmp_error_response(e, req_id, has_id)
    except Exception as e:  # noqa: BLE001 - a command's bug must not kill the process
        return qmp_error_response(MonitorError(f"{type(e).__name__}: {e}"), req_id, has_id)
    rsp: dict[str, Any] = {"return": {} if ret is None else ret}
    if has_id:
        rsp["id"] = req_id
    return rsp
