/* c-server: a sticky-cluster HTTP server in C. One program is both roles: started by you it is the
 * master (sticky_run spawns copies of it), in each copy serve() runs an epoll loop that takes routed
 * connections from sticky_worker_fd and answers every request with hello-worker's JSON:
 *     {"worker":<index>,"pid":<pid>,"remote":"<client address>"}
 *
 * Build:  cc -O2 -Wall -o c-server main.c $(pkg-config --cflags --libs sticky_cluster)
 * Run:    ./c-server --port 8080 --concurrency 4      (or ./c-server --config cluster.yaml)
 *         curl http://localhost:8080/                 (same client address, same worker, every time)
 * Stop:   Ctrl-C or SIGTERM: workers finish the requests they hold, then everything exits. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <sticky_cluster.h>

#define MAX_EVENTS 64
#define MAX_HEAD 8192

/* One client connection: the request head read so far, then the answer being written. */
struct connection {
    int fd;
    char remote[INET6_ADDRSTRLEN];
    char head[MAX_HEAD];
    size_t head_len;
    char answer[512];
    size_t answer_len;
    size_t answer_sent;
};

static int set_nonblocking(int fd) {
    int flags = fcntl(fd, F_GETFL);
    return flags < 0 ? -1 : fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

static void finish(int poller, struct connection *connection, int *open_connections) {
    epoll_ctl(poller, EPOLL_CTL_DEL, connection->fd, NULL);
    close(connection->fd);
    free(connection);
    (*open_connections)--;
}

/* Writes what is left of the answer; returns 1 when the connection is done. */
static int write_answer(int poller, struct connection *connection) {
    while (connection->answer_sent < connection->answer_len) {
        ssize_t sent = send(connection->fd, connection->answer + connection->answer_sent,
                            connection->answer_len - connection->answer_sent, MSG_NOSIGNAL);
        if (sent < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            struct epoll_event interest = {.events = EPOLLOUT, .data = {.ptr = connection}};
            epoll_ctl(poller, EPOLL_CTL_MOD, connection->fd, &interest);
            return 0;
        }
        if (sent < 0 && errno == EINTR) {
            continue;
        }
        if (sent <= 0) {
            return 1;
        }
        connection->answer_sent += (size_t)sent;
    }
    return 1;
}

/* Reads what the client sent; once the head is complete, starts the answer. Returns 1 when done. */
static int read_request(int poller, struct connection *connection, int index) {
    for (;;) {
        ssize_t got = recv(connection->fd, connection->head + connection->head_len,
                           MAX_HEAD - 1 - connection->head_len, 0);
        if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            return 0;
        }
        if (got < 0 && errno == EINTR) {
            continue;
        }
        if (got <= 0) {
            return 1;
        }
        connection->head_len += (size_t)got;
        connection->head[connection->head_len] = '\0';
        if (strstr(connection->head, "\r\n\r\n") != NULL) {
            break;
        }
        if (connection->head_len == MAX_HEAD - 1) {
            return 1;
        }
    }
    char body[128];
    int body_len = snprintf(body, sizeof body, "{\"worker\":%d,\"pid\":%d,\"remote\":\"%s\"}\n", index,
                            (int)getpid(), connection->remote);
    connection->answer_len = (size_t)snprintf(
        connection->answer, sizeof connection->answer,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        "Connection: close\r\n\r\n%s",
        body_len, body);
    return write_answer(poller, connection);
}

/* Takes every waiting connection. Returns 0 to go on, STICKY_ESHUTDOWN when the master asks to drain,
 * STICKY_ECLOSED when it is gone, -1 on error. */
static int accept_waiting(sticky_worker *worker, int poller, int *open_connections) {
    for (;;) {
        int fd;
        struct sockaddr_storage peer;
        socklen_t peer_len;
        int rc = sticky_worker_accept(worker, &fd, &peer, &peer_len);
        if (rc == STICKY_EAGAIN) {
            return 0;
        }
        if (rc == STICKY_ESHUTDOWN || rc == STICKY_ECLOSED) {
            return rc;
        }
        if (rc != STICKY_OK) {
            fprintf(stderr, "c-server: accept: %s\n", sticky_last_error_message());
            return -1;
        }
        struct connection *connection = calloc(1, sizeof *connection);
        if (connection == NULL || set_nonblocking(fd) < 0) {
            free(connection);
            close(fd);
            continue;
        }
        connection->fd = fd;
        const void *address = peer.ss_family == AF_INET6
                                  ? (const void *)&((struct sockaddr_in6 *)&peer)->sin6_addr
                                  : (const void *)&((struct sockaddr_in *)&peer)->sin_addr;
        inet_ntop(peer.ss_family, address, connection->remote, sizeof connection->remote);
        struct epoll_event interest = {.events = EPOLLIN | EPOLLRDHUP, .data = {.ptr = connection}};
        if (epoll_ctl(poller, EPOLL_CTL_ADD, fd, &interest) < 0) {
            close(fd);
            free(connection);
            continue;
        }
        (*open_connections)++;
    }
}

/* The worker: runs in every copy sticky_run starts. */
static int serve(sticky_worker *worker, void *user) {
    (void)user;
    int index = sticky_worker_index(worker);
    int channel = sticky_worker_fd(worker);
    int poller = epoll_create1(EPOLL_CLOEXEC);
    /* The channel's epoll data is NULL; every connection's is its struct connection. */
    struct epoll_event interest = {.events = EPOLLIN, .data = {.ptr = NULL}};
    if (poller < 0 || set_nonblocking(channel) < 0 ||
        epoll_ctl(poller, EPOLL_CTL_ADD, channel, &interest) < 0) {
        perror("c-server: epoll");
        return 1;
    }
    if (sticky_worker_ready(worker) != STICKY_OK) {
        fprintf(stderr, "c-server: ready: %s\n", sticky_last_error_message());
        close(poller);
        return 1;
    }
    int open_connections = 0, draining = 0, status = 0;
    while (!draining || open_connections > 0) {
        struct epoll_event events[MAX_EVENTS];
        int count = epoll_wait(poller, events, MAX_EVENTS, draining ? 10000 : -1);
        if (count < 0 && errno == EINTR) {
            continue;
        }
        if (count <= 0) {
            break; /* draining and no client said anything for 10 s: give up on them */
        }
        for (int i = 0; i < count; i++) {
            struct connection *connection = events[i].data.ptr;
            if (connection == NULL) {
                int drain = accept_waiting(worker, poller, &open_connections);
                if (drain != 0) {
                    epoll_ctl(poller, EPOLL_CTL_DEL, channel, NULL);
                    draining = 1;
                    status = drain < 0 ? 1 : 0;
                    fprintf(stderr, "c-server worker %d: %s, draining %d connections\n", index,
                            drain == STICKY_ESHUTDOWN ? "STICKY_ESHUTDOWN" : "master gone", open_connections);
                }
                continue;
            }
            int done = connection->answer_len == 0 ? read_request(poller, connection, index)
                                                   : write_answer(poller, connection);
            if (done) {
                finish(poller, connection, &open_connections);
            }
        }
    }
    close(poller);
    return status;
}

static void usage(const char *program) {
    fprintf(stderr, "usage: %s [--port N] [--concurrency N] [--debug] | --config FILE\n", program);
}

int main(int argc, char **argv) {
    sticky_options options;
    sticky_options_init(&options);
    const char *config = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--debug") == 0) {
            options.debug = true;
        } else if (i + 1 < argc && strcmp(argv[i], "--port") == 0) {
            options.port = (uint16_t)atoi(argv[++i]);
        } else if (i + 1 < argc && strcmp(argv[i], "--concurrency") == 0) {
            options.concurrency = (uint32_t)atoi(argv[++i]);
        } else if (i + 1 < argc && strcmp(argv[i], "--config") == 0) {
            config = argv[++i];
        } else {
            usage(argv[0]);
            return 2;
        }
    }
    int rc = config != NULL ? sticky_run_config(config, serve, NULL) : sticky_run(&options, serve, NULL);
    if (rc != STICKY_OK) {
        fprintf(stderr, "c-server: %s: %s\n", sticky_strerror(rc), sticky_last_error_message());
        return rc == STICKY_ECONFIG ? 2 : 1;
    }
    return 0;
}
