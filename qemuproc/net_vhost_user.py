"""Stands for net/vhost-user.c: ``-netdev vhost-user,id=ID,chardev=CHR[,queues=N]``.

``net_vhost_user_init`` makes one net client per queue pair, all on the one chardev, waits
for the back end (``qemu_chr_fe_wait_connected``) and starts it. ``net_vhost_user_event``
follows the chardev: CHR_EVENT_OPENED runs ``vhost_user_start`` (a ``vhost_net`` per pair:
features, protocol features, GET_QUEUE_NUM) and sets the link up, so that virtio-net starts
vhost when the driver is ready; CHR_EVENT_CLOSED takes the link down from a bottom half
(``chr_closed_bh``: vhost stops; the back end being gone, each ring's used index stands
for its position) and waits for the next OPENED, which a client chardev with
``reconnect=S`` brings.
"""

from __future__ import annotations

from typing import Any

from qemuproc.aio import aio_bh_schedule_oneshot
from qemuproc.char_socket import (
    QEMUChrEvent,
    SocketChardev,
    qemu_chr_fe_deinit,
    qemu_chr_fe_set_handlers,
    qemu_chr_fe_wait_connected,
    tcp_chr_disconnect,
)
from qemuproc.main_loop import MainLoop
from qemuproc.net import NetClientInfo, NetClientState, qemu_new_net_client, qmp_set_link
from qemuproc.vhost_net import (
    VHostNetState,
    vhost_net_cleanup,
    vhost_net_get_max_queues,
    vhost_net_init,
)
from qemuproc.vhost_user import VhostUserState

CONNECT_WAIT_S = 10.0


class VhostUserNetError(Exception):
    """The netdev cannot start: one line, QEMU's wording."""


class NetVhostUserState:
    """NetVhostUserState: one queue pair's client, its vhost_net, the shared chardev."""

    def __init__(self, nc: NetClientState, chr: SocketChardev, vhost_user: VhostUserState,
                 main_loop: MainLoop) -> None:
        self.nc = nc
        self.chr = chr
        self.vhost_user = vhost_user
        self.main_loop = main_loop
        self.vhost_net: VHostNetState | None = None
        self.started = False
        self.link_downs = 0
        self.start_errors = 0
        self.acked_features = 0  # what the guest acked, for a back end that comes back


def vhost_user_receive(nc: NetClientState, buf: Any) -> int:
    """Frames QEMU itself would send the back end (vhost not started): taken and dropped."""
    return len(buf)


def vhost_user_has_vnet_hdr(nc: NetClientState) -> bool:
    return True


def vhost_user_stop(ncs: list[NetClientState]) -> None:
    for nc in ncs:
        s: NetVhostUserState = nc.opaque
        if s.vhost_net is not None:
            vhost_net_cleanup(s.vhost_net)
            s.vhost_net = None


def vhost_user_start(ncs: list[NetClientState], be: VhostUserState) -> None:
    """A vhost_net per queue pair over the one back end; more pairs than it has is refused."""
    for i, nc in enumerate(ncs):
        s: NetVhostUserState = nc.opaque
        try:
            net = vhost_net_init(nc, -1, "", 0, s.main_loop, opaque=be)
        except OSError as e:
            vhost_user_stop(ncs[:i])
            raise VhostUserNetError(f"failed to init vhost_net for queue {i}: {e}") from None
        if i == 0 and len(ncs) > vhost_net_get_max_queues(net):
            vhost_net_cleanup(net)
            vhost_user_stop(ncs[:i])
            raise VhostUserNetError("you are asking more queues than supported: "
                                    f"{vhost_net_get_max_queues(net)}")
        if s.vhost_net is not None:
            vhost_net_cleanup(s.vhost_net)
        net.dev.acked_features |= s.acked_features  # vhost_user_get_acked_features
        s.vhost_net = net


def net_vhost_user_event(ncs: list[NetClientState], event: QEMUChrEvent) -> None:
    s: NetVhostUserState = ncs[0].opaque
    if event == QEMUChrEvent.CHR_EVENT_OPENED:
        try:
            vhost_user_start(ncs, s.vhost_user)
        except VhostUserNetError as e:
            s.start_errors += 1
            s.last_error = str(e)  # type: ignore[attr-defined]
            tcp_chr_disconnect(s.chr)
            return
        qmp_set_link(ncs, True)
        s.started = True
    elif event == QEMUChrEvent.CHR_EVENT_CLOSED:
        # vhost code in the middle of a message assumes the device stays: stop from a bh
        aio_bh_schedule_oneshot(s.main_loop.ctx, chr_closed_bh, ncs, "chr_closed_bh")


def chr_closed_bh(ncs: list[NetClientState]) -> None:
    """The link goes down (vhost stops); each pair's vhost_net stays until the back end is
    back and ``vhost_user_start`` replaces it."""
    s: NetVhostUserState = ncs[0].opaque
    s.link_downs += 1
    for nc in ncs:  # vhost_user_save_acked_features
        if nc.opaque.vhost_net is not None:
            nc.opaque.acked_features = nc.opaque.vhost_net.dev.acked_features
    qmp_set_link(ncs, False)


def net_vhost_user_init(main_loop: MainLoop, chr: SocketChardev, name: str,
                        queues: int) -> list[NetClientState]:
    """The netdev's clients, one per queue pair, started on a connected back end."""
    info = NetClientInfo("vhost-user", vhost_user_receive, has_vnet_hdr=vhost_user_has_vnet_hdr)
    be = VhostUserState(chr)
    ncs = []
    for i in range(queues):
        nc = qemu_new_net_client(info, None, "vhost-user", name)
        nc.queue_index = i
        nc.opaque = NetVhostUserState(nc, chr, be, main_loop)
        ncs.append(nc)
    try:
        qemu_chr_fe_wait_connected(chr, CONNECT_WAIT_S)
    except Exception as e:  # ChardevError: the one line QEMU prints
        raise VhostUserNetError(str(e)) from None
    qemu_chr_fe_set_handlers(chr, net_vhost_user_event, ncs)
    net_vhost_user_event(ncs, QEMUChrEvent.CHR_EVENT_OPENED)
    if not ncs[0].opaque.started:
        raise VhostUserNetError(getattr(ncs[0].opaque, "last_error", "vhost-user start failed"))
    return ncs


def vhost_user_cleanup(ncs: list[NetClientState]) -> None:
    vhost_user_stop(ncs)
    qemu_chr_fe_deinit(ncs[0].opaque.chr)


def describe(ncs: list[NetClientState]) -> dict[str, Any]:
    s: NetVhostUserState = ncs[0].opaque
    devs = [nc.opaque.vhost_net.dev for nc in ncs if nc.opaque.vhost_net is not None]
    return {"chardev": s.chr.describe(), "started": s.started, "link_down": ncs[0].link_down,
            "link_downs": s.link_downs, "start_errors": s.start_errors,
            "messages": s.vhost_user.messages,
            "protocol_features": hex(devs[0].protocol_features) if devs else None,
            "max_queues": devs[0].max_queues if devs else None,
            "ring_bases": {k: v for d in devs for k, v in d.ring_bases.items()}}
