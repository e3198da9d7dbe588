"""Stands for QEMU's command line (softmmu/vl.c with util/qemu-option.c's QemuOpts and
qdev's property setters), beside ``vreplica run``'s own options:

    -device virtio-net-pci,netdev=ID,ioeventfd=on|off,event_idx=on|off,mq=on|off,vectors=N,
            tx=bh|timer,x-txtimer=NS,x-txburst=N,mrg_rxbuf=on|off,
            disable-legacy=on|off|auto,disable-modern=on|off,packed=on|off
    -netdev user,id=ID,hostfwd=udp::HOSTPORT-:GUESTPORT
    -netdev tap,id=ID[,ifname=tap0][,script=no][,downscript=no][,vhost=on|off][,sndbuf=N]
            [,poll-us=N]
    -chardev socket,id=ID,path=PATH[,server=on|off][,wait=on|off][,reconnect=S]
    -netdev vhost-user,id=ID,chardev=ID[,queues=N]
    -trace [enable=]PATTERN[,events=FILE][,file=FILE]      -trace help
    -S      -m [size=]SIZE

Each is rewritten into the replica's own option (``ioeventfd=off`` is ``--ioeventfd off``)
where it stands in the command line, so the last of the two spellings wins, as the last
``-device`` property does in QEMU. A bad property is refused with QEMU's wording
(``Parameter 'ioeventfd' expects 'on' or 'off'``), prefixed like QEMU's by the option that
carried it; ``-device virtio-net-pci,help`` lists the properties with their defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

UINT32_MAX = 0xFFFFFFFF
INT32_MAX = 0x7FFFFFFF
DEVICE = "virtio-net-pci"


class QemuOptsError(Exception):
    """A bad QEMU option: one line, QEMU's wording, exit status 2."""


class QemuHelp(Exception):
    """A ``help`` was asked for: its text is the whole output, and the exit status 0."""


@dataclass(frozen=True)
class Prop:
    """One qdev property: its QEMU type, the replica's default, and the option it becomes."""

    name: str
    type: str
    default: Any
    option: str | None
    description: str = ""


NET_PROPS = {p.name: p for p in (
    Prop("any_layout", "bool", True, "--any-layout", "on/off"),
    Prop("disable-legacy", "OnOffAuto", "auto", None, "on/off/auto"),
    Prop("disable-modern", "bool", True, None, "on/off"),
    Prop("event_idx", "bool", True, "--event-idx", "on/off"),
    Prop("indirect_desc", "bool", True, "--indirect-desc", "on/off"),
    Prop("ioeventfd", "bool", True, "--ioeventfd", "on/off"),
    Prop("mq", "bool", False, None, "on/off"),
    Prop("mrg_rxbuf", "bool", False, "--mrg-rxbuf", "on/off"),
    Prop("netdev", "str", None, None, "ID of a netdev to use as a backend"),
    Prop("packed", "bool", False, "--ring", "on/off"),
    Prop("tx", "str", "bh", "--tx"),
    Prop("vectors", "uint32", UINT32_MAX, "--vectors",
         f"{UINT32_MAX}: one per queue and one for config changes"),
    Prop("x-txburst", "int32", 256, "--tx-burst"),
    Prop("x-txtimer", "uint32", 150000, "--tx-timer-ns"),
)}


def object_property_help(p: Prop) -> str:
    """qom/object_interfaces.c's object_property_help: one ``-device X,help`` line."""
    import json

    line = f"  {p.name}=<{p.type}>"
    if p.description or p.default is not None:
        line = f"{line:<24} - "
    line += p.description
    if p.default is not None:
        line += f" (default: {json.dumps(p.default)})"
    return line


def qdev_device_help() -> str:
    return "\n".join([f"{DEVICE} options:"] + [object_property_help(p) for _, p in
                                               sorted(NET_PROPS.items())])


def qemu_opts_parse(text: str, implied: str | None = None) -> list[tuple[str, str]]:
    """QemuOpts: ``key=value`` pairs split on commas (``,,`` is a comma in a value); a bare
    first word is the ``implied`` key's value, any other bare word ``key`` means ``key=on``."""
    parts: list[str] = []
    cur = ""
    i = 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                cur += ","
                i += 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += text[i]
        i += 1
    parts.append(cur)
    out = []
    for n, part in enumerate(parts):
        key, eq, value = part.partition("=")
        if not eq:
            if n == 0 and implied is not None:
                out.append((implied, part))
                continue
            key, value = part, "on"
        out.append((key, value))
    return out


def _set_prop(p: Prop, value: str) -> str:
    """The value checked as qdev's visitor checks it; returns it in the option's form."""
    if p.type == "OnOffAuto":
        if value not in ("on", "off", "auto"):
            raise ValueError(f"Parameter '{p.name}' does not accept value '{value}'")
        return value
    if p.type == "bool":
        if value not in ("on", "off", "yes", "no", "true", "false"):
            raise ValueError(f"Parameter '{p.name}' expects 'on' or 'off'")
        return "on" if value in ("on", "yes", "true") else "off"
    if p.type in ("uint32", "int32"):
        lo, hi = (0, UINT32_MAX) if p.type == "uint32" else (-INT32_MAX - 1, INT32_MAX)
        try:
            n = int(value, 0)
        except ValueError:
            n = None
        if n is None or not lo <= n <= hi or (p.type == "uint32" and value.startswith("-")):
            raise ValueError(f"Parameter '{p.name}' expects {p.type}")
        return str(n)
    if p.name == "tx" and value not in ("timer", "bh"):
        raise ValueError(f"virtio-net: Unknown option tx={value}, valid options: \"timer\" "
                         "\"bh\"")
    return value


def virtio_pci_transport(disable: dict[str, str]) -> str:
    """disable-legacy (auto: legacy on, a conventional PCI slot) and disable-modern (the
    replica's default: on) as --transport; both off is QEMU's realize error."""
    legacy = disable.get("disable-legacy", "auto") != "on"
    modern = disable.get("disable-modern", "on") == "off"
    if not legacy and not modern:
        raise ValueError("device cannot work as neither modern nor legacy mode is enabled")
    return "transitional" if legacy and modern else ("modern" if modern else "legacy")


def netdev_tap_option(key: str, value: str) -> list[str]:
    """One property of ``-netdev tap`` as the replica's option (net/tap.c's NetdevTapOptions);
    the run makes the tap (``tap0`` in its namespace), so no script runs."""
    if key in ("vhost", "vhostforce"):
        if value not in ("on", "off"):
            raise ValueError(f"Parameter '{key}' expects 'on' or 'off'")
        return ["--vhost", value] if key == "vhost" else []
    if key in ("sndbuf", "poll-us"):
        if not value.isdigit():
            kind = "a size" if key == "sndbuf" else "a number"
            raise ValueError(f"Parameter '{key}' expects {kind}")
        return ["--tap-sndbuf", value] if key == "sndbuf" else ["--poll-us", value]
    if key == "ifname":
        if value != "tap0":
            raise ValueError("the replica's tap is tap0, in the run's own network namespace")
        return []
    if key in ("script", "downscript"):
        if value != "no":
            raise ValueError(f"{key}={value}: the run sets the tap up itself ({key}=no)")
        return []
    raise ValueError(f"Invalid parameter '{key}'")


class QemuCommandLine:
    """The QEMU options of one command line, and what they become."""

    def __init__(self) -> None:
        self.netdevs: dict[str, str] = {}
        self.chardevs: dict[str, dict[str, Any]] = {}
        self.netdev_chardev: tuple[str, str] | None = None
        self.device_netdev: tuple[str, str] | None = None
        self.mq: bool | None = None
        self.devices = 0
        self.trace_enable: list[str] = []
        self.trace_file: str | None = None

    def device(self, arg: str) -> list[str]:
        opts = qemu_opts_parse(arg, implied="driver")
        driver = opts[0][1] if opts and opts[0][0] == "driver" else ""
        if driver != DEVICE:
            if driver == "help":
                raise QemuHelp(f"Network devices:\nname \"{DEVICE}\", bus PCI, alias "
                               "\"virtio-net\"")
            raise ValueError(f"'{driver}' is not a valid device model name")
        out: list[str] = []
        disable: dict[str, str] = {}
        for key, value in opts[1:]:
            if key == "help":
                raise QemuHelp(qdev_device_help())
            p = NET_PROPS.get(key)
            if p is None:
                raise ValueError(f"Property '{DEVICE}.{key}' not found")
            value = _set_prop(p, value)
            if key == "netdev":
                self.device_netdev = (arg, value)
            elif key == "mq":
                self.mq = value == "on"
            elif key == "vectors" and int(value) == UINT32_MAX:
                continue
            elif key == "packed":
                out += ["--ring", "packed" if value == "on" else "split"]
            elif key in ("disable-legacy", "disable-modern"):
                disable[key] = value
            elif p.option is not None:
                out += [p.option, value]
        self.devices += 1
        if self.devices > 1:
            raise ValueError("the replica has one virtio-net-pci NIC")
        if disable:
            out += ["--transport", virtio_pci_transport(disable)]
        return out

    def netdev(self, arg: str) -> list[str]:
        opts = qemu_opts_parse(arg, implied="type")
        kind = opts[0][1] if opts and opts[0][0] == "type" else ""
        if kind not in ("user", "tap", "vhost-user"):
            raise ValueError(f"Parameter 'type' does not accept value '{kind}' (the replica's "
                             "backends are -netdev user, tap and vhost-user)")
        ident = None
        out: list[str] = ["--netdev", kind] if kind != "user" else []
        for key, value in opts[1:]:
            if key == "id":
                ident = value
            elif kind == "vhost-user":
                out += self.netdev_vhost_user_option(arg, key, value)
            elif kind == "tap":
                out += netdev_tap_option(key, value)
            elif key == "hostfwd":
                if "--hostfwd" in out:
                    raise ValueError("the replica forwards one host port (one hostfwd=)")
                out += ["--hostfwd", value]
            else:
                raise ValueError(f"Invalid parameter '{key}'")
        if not ident:
            raise ValueError("Parameter 'id' is missing")
        if ident in self.netdevs:
            raise ValueError(f"Duplicate ID '{ident}' for netdev")
        self.netdevs[ident] = arg
        return out

    def netdev_vhost_user_option(self, arg: str, key: str, value: str) -> list[str]:
        """net/vhost-user.c's NetdevVhostUserOptions: the chardev (checked once the whole
        line is read) and the queue pairs."""
        if key == "chardev":
            self.netdev_chardev = (arg, value)
            return []
        if key == "queues":
            if not value.isdigit() or int(value) < 1:
                raise ValueError("Parameter 'queues' expects a number >= 1")
            return ["--queues", value]
        raise ValueError(f"Invalid parameter '{key}'")

    def chardev(self, arg: str) -> list[str]:
        """chardev/char-socket.c's options, for a Unix socket."""
        opts = qemu_opts_parse(arg, implied="backend")
        backend = opts[0][1] if opts and opts[0][0] == "backend" else ""
        if backend != "socket":
            raise ValueError(f"'{backend}' is not a valid char driver name (the replica has "
                             "socket)")
        spec: dict[str, Any] = {"server": False, "wait": True, "reconnect": 0}
        for key, value in opts[1:]:
            if key in ("id", "path"):
                spec[key] = value
            elif key in ("server", "wait"):
                if value not in ("on", "off"):
                    raise ValueError(f"Parameter '{key}' expects 'on' or 'off'")
                spec[key] = value == "on"
            elif key == "reconnect":
                if not value.isdigit():
                    raise ValueError("Parameter 'reconnect' expects a number")
                spec[key] = int(value)
            else:
                raise ValueError(f"Invalid parameter '{key}'")
        if "id" not in spec:
            raise ValueError("Parameter 'id' is missing")
        if "path" not in spec:
            raise ValueError("chardev: socket: no local address given (path=)")
        if spec["server"] and spec["reconnect"]:
            raise ValueError("'reconnect' option is incompatible with 'server' option")
        if spec["id"] in self.chardevs:
            raise ValueError(f"attempt to add duplicate property '{spec['id']}' to object "
                             "(type 'container')")
        self.chardevs[spec["id"]] = spec
        return []

    def trace(self, arg: str) -> list[str]:
        if arg == "help":
            return ["--trace-events", "help"]
        for key, value in qemu_opts_parse(arg, implied="enable"):
            if key == "enable":
                self.trace_enable.append(value)
            elif key == "events":
                try:
                    lines = Path(value).read_text().splitlines()
                except OSError as e:
                    raise ValueError(f"could not open trace events file '{value}': "
                                     f"{e.strerror}") from None
                self.trace_enable += [ln.strip() for ln in lines
                                      if ln.strip() and not ln.lstrip().startswith("#")]
            elif key == "file":
                self.trace_file = value
            else:
                raise ValueError(f"Invalid parameter '{key}'")
        return []

    @staticmethod
    def memory(arg: str) -> list[str]:
        opts = qemu_opts_parse(arg, implied="size")
        size = None
        for key, value in opts:
            if key != "size":
                raise ValueError(f"Invalid parameter '{key}'")
            size = value
        if not size:
            raise ValueError("missing 'size' option value")
        return ["--mem", size + "M" if size.isdigit() else size]

    def finish(self, argv: list[str]) -> list[str]:
        """The checks that need the whole line, and the options gathered across it."""
        if self.device_netdev is not None:
            arg, ident = self.device_netdev
            if ident not in self.netdevs:
                raise QemuOptsError(f"-device {arg}: Property '{DEVICE}.netdev' can't find value "
                                 f"'{ident}'")
        out: list[str] = []
        if self.netdev_chardev is not None:
            arg, ident = self.netdev_chardev
            if ident not in self.chardevs:
                raise QemuOptsError(f"-netdev {arg}: chardev \"{ident}\" not found")
            c = self.chardevs[ident]
            out += ["--chardev", ",".join(
                [f"id={c['id']}", f"path={c['path'].replace(',', ',,')}",
                 f"server={'on' if c['server'] else 'off'}",
                 f"wait={'on' if c['wait'] else 'off'}", f"reconnect={c['reconnect']}"])]
        queues = 1
        for i, a in enumerate(argv[:-1]):
            if a == "--queues" and argv[i + 1].isdigit():
                queues = int(argv[i + 1])
        if self.mq is False and queues > 1:
            raise QemuOptsError(f"-device {DEVICE},mq=off: --queues {queues} needs mq=on")
        if self.mq and queues == 1:
            raise QemuOptsError(f"-device {DEVICE},mq=on: multiqueue needs the queue pairs of a "
                             "multiqueue backend (--queues N)")
        if self.trace_enable:
            out += ["--trace-events", ",".join(self.trace_enable)]
        if self.trace_file:
            out += ["--trace", self.trace_file]
        return out


def qemu_options(argv: list[str]) -> list[str]:
    """``vreplica run``'s arguments with QEMU's options rewritten as the replica's."""
    line = QemuCommandLine()
    handlers: dict[str, Callable[[str], list[str]]] = {
        "-device": line.device, "-netdev": line.netdev, "-trace": line.trace,
        "-m": line.memory, "-chardev": line.chardev}
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "-S":
            out.append("--wait-attach")
        elif a in handlers:
            if i + 1 >= len(argv):
                raise QemuOptsError(f"{a} requires an argument")
            value = argv[i + 1]
            try:
                out += handlers[a](value)
            except ValueError as e:
                raise QemuOptsError(f"{a} {value}: {e}") from None
            i += 1
        else:
            out.append(a)
        i += 1
    return out + line.finish(out)
