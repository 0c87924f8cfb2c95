/* http_client.h: the test clients' one request, shared by the C test programs.
 * A GET from a chosen loopback source address, answer read until the server closes. */
#ifndef STICKY_TEST_HTTP_CLIENT_H
#define STICKY_TEST_HTTP_CLIENT_H

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

/* One GET from `source` (127.a.b.c) to 127.0.0.1:port, each send and receive waiting at most `timeout_s`;
 * the whole answer (headers and body) goes to `answer`, NUL-terminated. Returns its length: 0 when the
 * connection failed or brought nothing back (a lost connection). */
static inline size_t http_get(const char *source, int port, int timeout_s, char *answer, size_t size) {
    answer[0] = '\0';
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        return 0;
    }
    struct timeval timeout = {timeout_s, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
    struct sockaddr_in local = {.sin_family = AF_INET};
    inet_pton(AF_INET, source, &local.sin_addr);
    struct sockaddr_in server = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, "127.0.0.1", &server.sin_addr);
    const char request[] = "GET / HTTP/1.1\r\nHost: sticky\r\nConnection: close\r\n\r\n";
    size_t used = 0;
    if (bind(fd, (struct sockaddr *)&local, sizeof local) == 0 &&
        connect(fd, (struct sockaddr *)&server, sizeof server) == 0 &&
        send(fd, request, sizeof request - 1, MSG_NOSIGNAL) == (ssize_t)(sizeof request - 1)) {
        while (used < size - 1) {
            ssize_t got = recv(fd, answer + used, size - 1 - used, 0);
            if (got <= 0) {
                break;
            }
            used += (size_t)got;
        }
    }
    answer[used] = '\0';
    close(fd);
    return used;
}

#endif
