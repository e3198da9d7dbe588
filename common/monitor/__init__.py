"""QEMU's monitor/ directory, as the replica's processes serve it: the core (monitor.py), the
command table QMP and HMP share (commands.py), HMP (hmp.py), QMP (qmp.py), the commands
every process has (misc.py), the socket they listen on (chardev.py), a pdb session
(debugger.py) and the client side (client.py)."""
