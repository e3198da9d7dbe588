#!/bin/sh
# /init of the interop guest: load virtio-net, configure eth0 as slirp's guest (10.0.2.15),
# ping the gateway, send datagrams with udpsend, print the counts on the console, power off.
# The counts are read after a barrier whose answer can only come once the device has given
# back every transmit buffer (Linux counts a transmitted frame when it reclaims its buffer):
# udpsend's echoed datagram, or without a UDP receiver a last ping (a backend such as
# testpmd's icmpecho returns the request's buffer before it answers).
# Parameters come from the kernel command line as environment (vnr_ping, vnr_udp_port,
# vnr_udp_count, vnr_udp_size).
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in $(cat /lib/modules/load); do
    insmod "/lib/modules/$m.ko" || echo "VNR insmod $m failed"
done
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do
    sleep 0.1
    i=$((i + 1))
done
if [ -e /sys/class/net/eth0 ]; then
    echo "VNR features=$(cat /sys/class/net/eth0/device/features)"
    ip link set lo up
    ip link set eth0 up
    ip addr add "${vnr_ip:-10.0.2.15}/24" dev eth0
    ip route add default via "${vnr_gw:-10.0.2.2}"
    ping -c "${vnr_ping:-10}" -A -W 5 -w 60 "${vnr_gw:-10.0.2.2}" | tail -n 2 | sed 's/^/VNR ping: /'
    ping -c "${vnr_ping:-10}" -s 1472 -A -W 5 -w 60 "${vnr_gw:-10.0.2.2}" | tail -n 2 \
        | sed 's/^/VNR ping1472: /'
    if [ -n "$vnr_udp_port" ]; then
        /bin/udpsend "${vnr_gw:-10.0.2.2}" "$vnr_udp_port" "${vnr_udp_count:-100}" \
            "${vnr_udp_size:-64}" | sed 's/^/VNR /'
    else
        ping -c 1 -W 10 "${vnr_gw:-10.0.2.2}" | tail -n 2 | head -n 1 | sed 's/^/VNR barrier: /'
    fi
    s=/sys/class/net/eth0/statistics
    echo "VNR stats rx_packets=$(cat $s/rx_packets) tx_packets=$(cat $s/tx_packets)" \
        "rx_dropped=$(cat $s/rx_dropped) tx_dropped=$(cat $s/tx_dropped)" \
        "rx_errors=$(cat $s/rx_errors) tx_errors=$(cat $s/tx_errors)"
else
    echo "VNR no eth0"
fi
echo "VNR done"
poweroff -f
