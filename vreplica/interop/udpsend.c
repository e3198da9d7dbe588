/* The interop guest's datagram sender: COUNT UDP datagrams of SIZE bytes to DST:PORT, each
 * starting with its sequence number (32-bit, network order). A full socket buffer blocks, so
 * the guest's qdisc and virtio-net's TX ring pace it. Then a barrier: one datagram numbered
 * 0xffffffff that the receiver echoes; its echo comes back only after the device has given
 * back every transmit buffer before it. Prints "udpsend sent=N echoed=0|1". */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#define BARRIER_SEQ 0xffffffffu
#define BARRIER_WAIT_S 60

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: udpsend DST PORT COUNT SIZE\n");
        return 2;
    }
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &dst.sin_addr) != 1) {
        fprintf(stderr, "udpsend: bad address %s\n", argv[1]);
        return 2;
    }
    long count = atol(argv[3]);
    size_t size = (size_t)atol(argv[4]);
    if (count < 0 || size < 4 || size > 65507) {
        fprintf(stderr, "udpsend: bad count or size\n");
        return 2;
    }
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) {
        perror("udpsend: socket");
        return 1;
    }
    unsigned char *buf = calloc(1, size);
    if (!buf)
        return 1;
    for (size_t i = 4; i < size; i++)
        buf[i] = (unsigned char)i;
    long sent = 0;
    for (long seq = 0; seq < count; seq++) {
        uint32_t be = htonl((uint32_t)seq);
        memcpy(buf, &be, 4);
        ssize_t n;
        do {
            n = sendto(fd, buf, size, 0, (struct sockaddr *)&dst, sizeof(dst));
        } while (n < 0 && (errno == ENOBUFS || errno == EAGAIN || errno == EINTR));
        if (n != (ssize_t)size) {
            perror("udpsend: sendto");
            break;
        }
        sent++;
    }
    int echoed = 0;
    uint32_t barrier = htonl(BARRIER_SEQ);
    memcpy(buf, &barrier, 4);
    struct timeval wait = {.tv_sec = BARRIER_WAIT_S};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &wait, sizeof(wait));
    if (sendto(fd, buf, size, 0, (struct sockaddr *)&dst, sizeof(dst)) == (ssize_t)size) {
        unsigned char reply[64];
        ssize_t n = recv(fd, reply, sizeof(reply), 0);
        echoed = n >= 4 && memcmp(reply, &barrier, 4) == 0;
    }
    printf("udpsend sent=%ld echoed=%d\n", sent, echoed);
    return sent == count && echoed ? 0 : 1;
}
