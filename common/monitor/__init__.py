"""QEMU's monitor/ directory, as the replica's processes serve it: the core (monitor.py), the
command table QMP and HMP share (commands.py), HMP (hmp.py), QMP (qmp.py), the commands
every process has (misc.py), the socket they listen on (chardev.py), a pdb session
(debugger.py) and the client side (client.py). The names a tool needs to reach a running
process's monitor are here too."""

from common.monitor.client import MonitorConnection, query
from common.monitor.commands import MonitorError
from common.monitor.monitor import pid_path, qmp_path, socket_path

__all__ = ["MonitorConnection", "MonitorError", "pid_path", "qmp_path", "query", "socket_path"]
