/* epoll_worker: a worker started by the sticky-cluster binary that waits on sticky_worker_fd with epoll
 * after making it O_NONBLOCK, accepts until STICKY_EAGAIN, and answers hello-worker's JSON.
 * On STICKY_ESHUTDOWN it prints "ok" (or "FAIL" when it never met STICKY_EAGAIN) and exits.
 * Usage: sticky-cluster --port 0 --concurrency N -- epoll_worker */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>

#include <sticky_cluster.h>

#include "http_answer.h"

int main(void) {
    /* The master's SIGTERM comes together with its shutdown message; drain on the message. */
    signal(SIGTERM, SIG_IGN);
    sticky_worker *worker = NULL;
    int rc = sticky_worker_open(&worker);
    if (rc != STICKY_OK) {
        fprintf(stderr, "epoll worker: FAIL open: %s: %s\n", sticky_strerror(rc), sticky_last_error_message());
        return 2;
    }
    int index = sticky_worker_index(worker);
    int channel = sticky_worker_fd(worker);
    int flags = fcntl(channel, F_GETFL);
    if (flags < 0 || fcntl(channel, F_SETFL, flags | O_NONBLOCK) < 0) {
        perror("fcntl");
        sticky_worker_close(worker);
        return 1;
    }
    int poller = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event interest = {.events = EPOLLIN, .data = {.fd = channel}};
    if (poller < 0 || epoll_ctl(poller, EPOLL_CTL_ADD, channel, &interest) < 0) {
        perror("epoll");
        sticky_worker_close(worker);
        return 1;
    }
    /* Before ready nothing is routed here: the non-blocking channel must say so. */
    int early = -1;
    rc = sticky_worker_accept(worker, &early, NULL, NULL);
    int eagain_before_ready = rc == STICKY_EAGAIN && early == -1;
    sticky_worker_ready(worker);
    int served = 0, eagain = 0, status = 0;
    for (int running = 1; running;) {
        struct epoll_event event;
        int ready = epoll_wait(poller, &event, 1, 30000);
        if (ready < 0 && errno == EINTR) {
            continue;
        }
        if (ready <= 0) {
            fprintf(stderr, "epoll worker %d: FAIL no event in 30 s\n", index);
            status = 1;
            break;
        }
        for (;;) {
            int conn = -1;
            rc = sticky_worker_accept(worker, &conn, NULL, NULL);
            if (rc == STICKY_EAGAIN) {
                eagain++;
                break;
            }
            if (rc == STICKY_ESHUTDOWN) {
                epoll_ctl(poller, EPOLL_CTL_DEL, channel, NULL);
                int ok = eagain_before_ready && eagain > 0 && served > 0;
                fprintf(stderr, "epoll worker %d: %s STICKY_ESHUTDOWN after %d connections, %d STICKY_EAGAIN%s\n",
                        index, ok ? "ok" : "FAIL", served, eagain,
                        eagain_before_ready ? "" : " (no STICKY_EAGAIN before ready)");
                status = ok ? 0 : 1;
                running = 0;
                break;
            }
            if (rc != STICKY_OK) {
                fprintf(stderr, "epoll worker %d: FAIL accept: %s: %s\n", index, sticky_strerror(rc),
                        sticky_last_error_message());
                status = 1;
                running = 0;
                break;
            }
            /* peer was NULL: the socket itself still knows the client. */
            struct sockaddr_storage peer;
            socklen_t peer_len = sizeof peer;
            char remote[INET6_ADDRSTRLEN] = "unknown";
            if (getpeername(conn, (struct sockaddr *)&peer, &peer_len) == 0) {
                peer_text(&peer, remote, sizeof remote);
            }
            if (answer_request(conn, index, remote) == 0) {
                served++;
            }
        }
    }
    close(poller);
    sticky_worker_close(worker);
    return status;
}
