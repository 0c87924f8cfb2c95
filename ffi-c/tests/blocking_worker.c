/* blocking_worker: a cluster in one C program through sticky_run. The master (the process started)
 * spawns copies of itself; each copy's serve() accepts with blocking sticky_worker_accept calls and
 * answers hello-worker's JSON until STICKY_ESHUTDOWN.
 * Usage: blocking_worker PORT CONCURRENCY */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sticky_cluster.h>

#include "http_answer.h"

struct settings {
    int concurrency;
};

static int serve(sticky_worker *worker, void *user) {
    const struct settings *settings = user;
    int index = sticky_worker_index(worker);
    const char *env_index = getenv("STICKY_CLUSTER_WORKER_INDEX");
    if (index < 0 || index >= settings->concurrency || env_index == NULL || atoi(env_index) != index ||
        sticky_worker_concurrency(worker) != settings->concurrency) {
        fprintf(stderr, "blocking worker: FAIL index %d of %d does not match the environment\n", index,
                sticky_worker_concurrency(worker));
        return 1;
    }
    int rc = sticky_worker_ready(worker);
    if (rc != STICKY_OK) {
        fprintf(stderr, "blocking worker %d: FAIL ready: %s\n", index, sticky_last_error_message());
        return 1;
    }
    int served = 0;
    for (;;) {
        int conn = -1;
        struct sockaddr_storage peer;
        socklen_t peer_len = 0;
        rc = sticky_worker_accept(worker, &conn, &peer, &peer_len);
        if (rc == STICKY_ESHUTDOWN) {
            fprintf(stderr,
                    "blocking worker %d: ok STICKY_ESHUTDOWN after %d connections (deadline %lld ms)\n",
                    index, served, (long long)sticky_worker_shutdown_deadline_ms(worker));
            return STICKY_OK;
        }
        if (rc != STICKY_OK) {
            fprintf(stderr, "blocking worker %d: FAIL accept: %s (%s)\n", index, sticky_strerror(rc),
                    sticky_last_error_message());
            return 1;
        }
        if (peer_len == 0 || peer_len > sizeof peer) {
            fprintf(stderr, "blocking worker %d: FAIL peer_len %u\n", index, (unsigned)peer_len);
            close(conn);
            return 1;
        }
        char remote[INET6_ADDRSTRLEN];
        peer_text(&peer, remote, sizeof remote);
        if (answer_request(conn, index, remote) == 0) {
            served++;
        }
    }
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s PORT CONCURRENCY\n", argv[0]);
        return 2;
    }
    struct settings settings = {atoi(argv[2])};
    sticky_options options;
    sticky_options_init(&options);
    options.port = (uint16_t)atoi(argv[1]);
    options.concurrency = (uint32_t)settings.concurrency;
    options.hard_shutdown_delay_ms = 10000;
    options.prefix = "blocking-test:";
    int rc = sticky_run(&options, serve, &settings);
    if (rc != STICKY_OK) {
        fprintf(stderr, "blocking_worker: sticky_run: %s: %s\n", sticky_strerror(rc), sticky_last_error_message());
        return 1;
    }
    return 0;
}
