/* reload: SIGHUP in a C program, as ffi-c/README.md tells an embedding to handle it, and a client that
 * must lose no connection while the workers restart one index at a time.
 *
 *   reload handle CONCURRENCY   the embedding: sticky_cluster_start, then a sigwait loop. SIGHUP: a bad
 *                               reload first (concurrency 0: STICKY_ECONFIG, nothing changes), then the same
 *                               options with RELOAD_GENERATION one higher; SIGTERM: stop, wait, free.
 *   reload file PATH            sticky_run_config(PATH): the library re-reads the file on SIGHUP.
 *   reload client PORT CONCURRENCY GENERATION
 *                               connects from 127.0.2.x back to back; prints "warm" once every index
 *                               answered, and exits 0 once every index answered from GENERATION with no
 *                               connection lost (no answer or a broken one), 1 otherwise (60 s limit).
 *
 * Workers (copies of this program) answer {"worker":i,"pid":p,"generation":"G"} and log, on stderr,
 * "reload-test: worker I gen G start|ready|shutdown|exit T" with T in CLOCK_MONOTONIC microseconds, from
 * which run-tests.sh checks that no two indexes were being replaced at the same time. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
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

static long long now_us(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (long long)now.tv_sec * 1000000 + now.tv_nsec / 1000;
}

/* --- worker: each event is logged at a moment inside the master's view of it (ready before it is sent,
 * exit before it happens), so the run-tests.sh check can only miss an overlap, never invent one. */

static void worker_event(int index, const char *generation, const char *event) {
    fprintf(stderr, "reload-test: worker %d gen %s %s %lld\n", index, generation, event, now_us());
}

static int serve(sticky_worker *worker, void *user) {
    (void)user;
    int index = sticky_worker_index(worker);
    const char *generation = getenv("RELOAD_GENERATION");
    if (generation == NULL) {
        generation = "none";
    }
    worker_event(index, generation, "start");
    worker_event(index, generation, "ready");
    if (sticky_worker_ready(worker) != STICKY_OK) {
        fprintf(stderr, "reload-test: worker %d: FAIL ready: %s\n", index, sticky_last_error_message());
        return 1;
    }
    for (;;) {
        int conn = -1;
        int rc = sticky_worker_accept(worker, &conn, NULL, NULL);
        if (rc == STICKY_ESHUTDOWN) {
            worker_event(index, generation, "shutdown");
            worker_event(index, generation, "exit");
            return STICKY_OK;
        }
        if (rc != STICKY_OK) {
            fprintf(stderr, "reload-test: worker %d: FAIL accept: %s\n", index, sticky_last_error_message());
            return 1;
        }
        char body[128];
        snprintf(body, sizeof body, "{\"worker\":%d,\"pid\":%d,\"generation\":\"%s\"}\n", index, (int)getpid(),
                 generation);
        answer_with(conn, body);
    }
}

/* --- the embedding: what a C program does on SIGHUP ---------------------------------------------------- */

static int run_handle(int concurrency) {
    /* Block the signals this thread waits for before the master's thread exists: it inherits the mask. */
    sigset_t signals;
    sigemptyset(&signals);
    sigaddset(&signals, SIGHUP);
    sigaddset(&signals, SIGTERM);
    sigaddset(&signals, SIGINT);
    pthread_sigmask(SIG_BLOCK, &signals, NULL);

    int generation = 1;
    char env_entry[64];
    snprintf(env_entry, sizeof env_entry, "RELOAD_GENERATION=%d", generation);
    const char *env[] = {env_entry, NULL};
    sticky_options options;
    sticky_options_init(&options);
    options.host = "127.0.0.1";
    options.port = 0;
    options.concurrency = (uint32_t)concurrency;
    options.hard_shutdown_delay_ms = 10000;
    options.prefix = "reload-test:";
    options.env = env;
    sticky_cluster *cluster = NULL;
    int rc = sticky_cluster_start(&options, &cluster);
    if (rc != STICKY_OK) {
        fprintf(stderr, "reload-test: FAIL sticky_cluster_start: %s\n", sticky_last_error_message());
        return 1;
    }
    fprintf(stderr, "reload-test: the cluster listens on port %d\n", sticky_cluster_port(cluster));
    int failures = 0;
    for (;;) {
        int signal_number = 0;
        if (sigwait(&signals, &signal_number) != 0) {
            continue;
        }
        if (signal_number != SIGHUP) {
            break;
        }
        /* A bad configuration changes nothing and says why. */
        sticky_options bad = options;
        bad.concurrency = 0;
        rc = sticky_cluster_reload(cluster, &bad);
        if (rc == STICKY_ECONFIG &&
            strcmp(sticky_last_error_message(), "sticky_options.concurrency: must be at least 1, got 0") == 0) {
            fprintf(stderr, "reload-test: ok a bad reload is refused: %s\n", sticky_last_error_message());
        } else {
            fprintf(stderr, "reload-test: FAIL a bad reload gave %d: %s\n", rc, sticky_last_error_message());
            failures++;
        }
        /* The new options: here, the workers' environment changes, so they restart one at a time. */
        generation++;
        snprintf(env_entry, sizeof env_entry, "RELOAD_GENERATION=%d", generation);
        rc = sticky_cluster_reload(cluster, &options);
        if (rc == STICKY_OK) {
            fprintf(stderr, "reload-test: reloading to generation %d\n", generation);
        } else {
            fprintf(stderr, "reload-test: FAIL reload: %s\n", sticky_last_error_message());
            failures++;
        }
    }
    rc = sticky_cluster_stop(cluster, false);
    if (rc == STICKY_OK) {
        rc = sticky_cluster_wait(cluster);
    }
    if (rc != STICKY_OK) {
        fprintf(stderr, "reload-test: FAIL stop: %s: %s\n", sticky_strerror(rc), sticky_last_error_message());
        failures++;
    }
    /* Waiting again answers the same; a stopped cluster takes no more reloads. */
    if (sticky_cluster_wait(cluster) != rc || sticky_cluster_reload(cluster, &options) != STICKY_ECLOSED) {
        fprintf(stderr, "reload-test: FAIL a stopped cluster still answers as a running one\n");
        failures++;
    }
    sticky_cluster_free(cluster);
    return failures == 0 ? 0 : 1;
}

/* --- client ------------------------------------------------------------------------------------------ */

/* One GET from `source`; returns the answering worker and its generation, or -1 for a lost connection. */
static int fetch(const char *source, int port, int *generation) {
    char answer[2048];
    http_get(source, port, 15, answer, sizeof answer);
    const char *body = strstr(answer, "\r\n\r\n");
    int worker = -1, pid = 0;
    if (body == NULL || sscanf(body + 4, "{\"worker\":%d,\"pid\":%d,\"generation\":\"%d\"}", &worker, &pid,
                               generation) != 3) {
        fprintf(stderr, "reload-client: FAIL %s: lost (answer: %s)\n", source, answer);
        return -1;
    }
    return worker;
}

static int run_client(int port, int concurrency, int target) {
    if (concurrency < 1 || concurrency > 64) {
        return 2;
    }
    int answered[64] = {0}, on_target[64] = {0};
    int requests = 0, lost = 0, warm = 0, done_at = -1;
    long long deadline = now_us() + 60 * 1000000LL;
    for (int i = 0; now_us() < deadline; i++) {
        char source[32];
        snprintf(source, sizeof source, "127.0.2.%d", 1 + i % 250);
        int generation = 0;
        int worker = fetch(source, port, &generation);
        requests++;
        if (worker < 0 || worker >= concurrency) {
            lost++;
            continue;
        }
        answered[worker] = 1;
        on_target[worker] |= generation == target;
        int all_answered = 1, all_on_target = 1;
        for (int index = 0; index < concurrency; index++) {
            all_answered &= answered[index];
            all_on_target &= on_target[index];
        }
        if (all_answered && !warm) {
            warm = 1;
            printf("warm\n");
            fflush(stdout);
        }
        /* Some more after the last index moved, so that its successor is seen serving, not just starting. */
        if (all_on_target && done_at < 0) {
            done_at = requests + 50;
        }
        if (done_at >= 0 && requests >= done_at) {
            break;
        }
    }
    int done = done_at >= 0 && requests >= done_at;
    printf("reload-client: %d requests, %d lost, %s generation %d on all %d workers\n", requests, lost,
           done ? "reached" : "did NOT reach", target, concurrency);
    return lost == 0 && done ? 0 : 1;
}

int main(int argc, char **argv) {
    if (sticky_in_worker()) {
        /* This program's copies: the options are not needed here (sticky_run ignores them in a worker). */
        return sticky_run(NULL, serve, NULL) == STICKY_OK ? 0 : 1;
    }
    if (argc == 3 && strcmp(argv[1], "handle") == 0) {
        return run_handle(atoi(argv[2]));
    }
    if (argc == 3 && strcmp(argv[1], "file") == 0) {
        int rc = sticky_run_config(argv[2], serve, NULL);
        if (rc != STICKY_OK) {
            fprintf(stderr, "reload-test: FAIL sticky_run_config: %s\n", sticky_last_error_message());
        }
        return rc == STICKY_OK ? 0 : 1;
    }
    if (argc == 5 && strcmp(argv[1], "client") == 0) {
        return run_client(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]));
    }
    fprintf(stderr, "usage: %s handle CONCURRENCY | file PATH | client PORT CONCURRENCY GENERATION\n", argv[0]);
    return 2;
}
