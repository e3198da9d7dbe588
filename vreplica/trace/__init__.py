"""Trace files: merging, QEMU's log format, the event list, compare, show and render."""
