/* http_answer.h: the hello-worker answer, shared by the C test workers.
 * Reads one request head from a blocking socket and answers {"worker":i,"pid":p,"remote":"..."} (or any body). */
#ifndef STICKY_TEST_HTTP_ANSWER_H
#define STICKY_TEST_HTTP_ANSWER_H

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

/* The address text Node prints for socket.remoteAddress (inet_ntop gives the same for these forms). */
static inline void peer_text(const struct sockaddr_storage *peer, char *out, size_t size) {
    if (peer->ss_family == AF_INET6) {
        inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)peer)->sin6_addr, out, (socklen_t)size);
    } else if (peer->ss_family == AF_INET) {
        inet_ntop(AF_INET, &((const struct sockaddr_in *)peer)->sin_addr, out, (socklen_t)size);
    } else {
        snprintf(out, size, "unknown");
    }
}

/* Reads one request head from a blocking connection; returns 0 when a whole head arrived. */
static inline int read_request_head(int conn) {
    struct timeval timeout = {5, 0};
    setsockopt(conn, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    char head[8192];
    size_t used = 0;
    while (used < sizeof head - 1) {
        ssize_t got = recv(conn, head + used, sizeof head - 1 - used, 0);
        if (got <= 0) {
            return -1;
        }
        used += (size_t)got;
        head[used] = '\0';
        if (strstr(head, "\r\n\r\n") != NULL) {
            return 0;
        }
    }
    return -1;
}

/* Answers one request with `body` (JSON) and closes the connection; returns 0 when the answer was sent. */
static inline int answer_with(int conn, const char *body) {
    if (read_request_head(conn) < 0) {
        close(conn);
        return -1;
    }
    char response[1024];
    int len = snprintf(response, sizeof response,
                       "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                       "Connection: close\r\n\r\n%s",
                       (int)strlen(body), body);
    ssize_t sent = send(conn, response, (size_t)len, MSG_NOSIGNAL);
    close(conn);
    return sent == len ? 0 : -1;
}

/* Answers one request on a blocking connection and closes it; returns 0 when an answer was sent. */
static inline int answer_request(int conn, int index, const char *remote) {
    char body[256];
    snprintf(body, sizeof body, "{\"worker\":%d,\"pid\":%d,\"remote\":\"%s\"}\n", index, (int)getpid(), remote);
    return answer_with(conn, body);
}

#endif
