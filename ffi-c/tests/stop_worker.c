/* stop_worker: a C worker that stops accepting while connections are in flight loses none, whether it
 * decides so itself (sticky_worker_stop_accepting) or gets SIGTERM from someone else than the master.
 *
 *   stop_worker master MARKER   sticky_run with one worker on 127.0.0.1, any port. Each request takes
 *                               100 ms, so clients' connections queue in the worker's channel. With
 *                               STOP_TEST_SELF=N in the environment the first worker (the one that creates
 *                               MARKER) calls sticky_worker_stop_accepting after N connections.
 *   stop_worker client PORT     four threads connect back to back from 127.0.3.x; prints "warm PID" once
 *                               the worker answered, and exits 0 once another pid (the successor) answered
 *                               20 times with no connection lost, 1 otherwise (60 s limit).
 *
 * Workers log "stop-test: worker pid P stopped accepting after N" and "stop-test: worker pid P drained:
 * served M, STICKY_ECLOSED" (or "... STICKY_ESHUTDOWN" at the master's shutdown). */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <sticky_cluster.h>

#include "http_answer.h"
#include "http_client.h"

static const char *marker_path;

/* --- worker ------------------------------------------------------------------------------------------ */

static int first_worker(void) {
    int fd = open(marker_path, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0600);
    if (fd < 0) {
        return 0;
    }
    close(fd);
    return 1;
}

static void sleep_ms(long ms) {
    struct timespec left = {ms / 1000, (ms % 1000) * 1000000L};
    /* A SIGTERM from outside interrupts the sleep: finish it, the request is still being served. */
    while (nanosleep(&left, &left) != 0 && errno == EINTR) {
    }
}

static int serve(sticky_worker *worker, void *user) {
    (void)user;
    const char *self = getenv("STOP_TEST_SELF");
    int stop_after = self != NULL && first_worker() ? atoi(self) : -1;
    if (sticky_worker_ready(worker) != STICKY_OK) {
        fprintf(stderr, "stop-test: FAIL ready: %s\n", sticky_last_error_message());
        return 1;
    }
    int served = 0;
    for (;;) {
        if (served == stop_after) {
            int rc = sticky_worker_stop_accepting(worker);
            fprintf(stderr, "stop-test: worker pid %d stopped accepting after %d%s\n", (int)getpid(), served,
                    rc == STICKY_OK ? "" : " (FAIL stop_accepting)");
            /* Calling it again does nothing. */
            if (sticky_worker_stop_accepting(worker) != STICKY_OK) {
                fprintf(stderr, "stop-test: FAIL a second stop_accepting\n");
            }
        }
        int conn = -1;
        int rc = sticky_worker_accept(worker, &conn, NULL, NULL);
        if (rc == STICKY_ECLOSED || rc == STICKY_ESHUTDOWN) {
            fprintf(stderr, "stop-test: worker pid %d drained: served %d, %s\n", (int)getpid(), served,
                    rc == STICKY_ECLOSED ? "STICKY_ECLOSED" : "STICKY_ESHUTDOWN");
            return STICKY_OK;
        }
        if (rc != STICKY_OK) {
            fprintf(stderr, "stop-test: FAIL accept: %s\n", sticky_last_error_message());
            return 1;
        }
        if (read_request_head(conn) < 0) {
            fprintf(stderr, "stop-test: FAIL no request head on a routed connection\n");
            close(conn);
            continue;
        }
        sleep_ms(100);
        char response[256];
        char body[64];
        snprintf(body, sizeof body, "{\"pid\":%d}\n", (int)getpid());
        int len = snprintf(response, sizeof response,
                           "HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", (int)strlen(body),
                           body);
        if (send(conn, response, (size_t)len, MSG_NOSIGNAL) == len) {
            served++;
        }
        close(conn);
    }
}

/* --- client ------------------------------------------------------------------------------------------ */

static int port;
static atomic_int lost, requests, first_pid, successor_answers, stop;
static atomic_int next_source;

/* One GET; returns the answering pid, or -1 for a lost connection (refused, reset, no whole answer). */
static int fetch(const char *source) {
    char answer[1024];
    http_get(source, port, 20, answer, sizeof answer);
    const char *body = strstr(answer, "\r\n\r\n");
    int pid = -1;
    if (body == NULL || strstr(answer, "HTTP/1.1 200 OK") != answer || sscanf(body + 4, "{\"pid\":%d}", &pid) != 1) {
        fprintf(stderr, "stop-client: FAIL %s: lost (answer: %s)\n", source, answer);
        return -1;
    }
    return pid;
}

static void *client_thread(void *unused) {
    (void)unused;
    while (!atomic_load(&stop)) {
        char source[32];
        snprintf(source, sizeof source, "127.0.3.%d", 1 + atomic_fetch_add(&next_source, 1) % 250);
        int pid = fetch(source);
        atomic_fetch_add(&requests, 1);
        if (pid < 0) {
            atomic_fetch_add(&lost, 1);
            continue;
        }
        int expected = 0;
        if (atomic_compare_exchange_strong(&first_pid, &expected, pid)) {
            printf("warm %d\n", pid);
            fflush(stdout);
        } else if (pid != atomic_load(&first_pid) && atomic_fetch_add(&successor_answers, 1) + 1 >= 20) {
            atomic_store(&stop, 1);
        }
    }
    return NULL;
}

static int run_client(void) {
    pthread_t threads[4];
    for (int i = 0; i < 4; i++) {
        pthread_create(&threads[i], NULL, client_thread, NULL);
    }
    for (int waited = 0; waited < 600 && !atomic_load(&stop); waited++) {
        usleep(100000);
    }
    int finished = atomic_load(&stop);
    atomic_store(&stop, 1);
    for (int i = 0; i < 4; i++) {
        pthread_join(threads[i], NULL);
    }
    printf("stop-client: %d requests, %d lost, %s\n", atomic_load(&requests), atomic_load(&lost),
           finished ? "the successor served 20" : "NO successor served 20 within 60 s");
    return finished && atomic_load(&lost) == 0 ? 0 : 1;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "client") == 0) {
        port = atoi(argv[2]);
        return run_client();
    }
    if (argc != 3 || strcmp(argv[1], "master") != 0) {
        fprintf(stderr, "usage: %s master MARKER | client PORT\n", argv[0]);
        return 2;
    }
    marker_path = argv[2];
    sticky_options options;
    sticky_options_init(&options);
    options.host = "127.0.0.1";
    options.port = 0;
    options.concurrency = 1;
    options.hard_shutdown_delay_ms = 10000;
    options.prefix = "stop-test:";
    int rc = sticky_run(&options, serve, NULL);
    if (rc != STICKY_OK) {
        fprintf(stderr, "stop-test: FAIL sticky_run: %s: %s\n", sticky_strerror(rc), sticky_last_error_message());
        return 1;
    }
    return 0;
}
