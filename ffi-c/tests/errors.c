/* errors: every documented failure of the C ABI, without a running cluster: NULL arguments, a missing or
 * wrong worker environment, a non-blocking channel with nothing waiting, a channel the master closed,
 * invalid options and YAML, an address in use, error texts, and the per-thread last error.
 * Run with no STICKY_CLUSTER_* variables in the environment. */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <sticky_cluster.h>

static int checks, failures;

#define CHECK(condition, ...)                                                  \
    do {                                                                       \
        checks++;                                                              \
        if (!(condition)) {                                                    \
            failures++;                                                        \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #condition); \
            fprintf(stderr, __VA_ARGS__);                                      \
            fprintf(stderr, "\n");                                             \
        }                                                                      \
    } while (0)

static int serve_calls;

static int never_serve(sticky_worker *worker, void *user) {
    (void)worker;
    (void)user;
    serve_calls++;
    return 99;
}

static void *fail_in_another_thread(void *unused) {
    (void)unused;
    int rc = sticky_worker_open(NULL);
    CHECK(rc == STICKY_EINVAL, "open(NULL) in a thread gave %d", rc);
    CHECK(strcmp(sticky_last_error_message(), "out must not be NULL") == 0, "thread message %s",
          sticky_last_error_message());
    return NULL;
}

static void set_worker_env(const char *fd, const char *index) {
    setenv("STICKY_CLUSTER_FD", fd, 1);
    if (index != NULL) {
        setenv("STICKY_CLUSTER_WORKER_INDEX", index, 1);
        setenv("STICKY_CLUSTER_CONCURRENCY", "3", 1);
    } else {
        unsetenv("STICKY_CLUSTER_WORKER_INDEX");
    }
}

static void clear_worker_env(void) {
    unsetenv("STICKY_CLUSTER_FD");
    unsetenv("STICKY_CLUSTER_WORKER_INDEX");
    unsetenv("STICKY_CLUSTER_CONCURRENCY");
}

static void error_texts(void) {
    CHECK(strcmp(sticky_last_error_message(), "") == 0, "fresh thread has message %s", sticky_last_error_message());
    CHECK(sticky_last_os_error() == 0, "fresh thread has os error");
    for (int a = STICKY_OK; a <= STICKY_EINTERNAL; a++) {
        CHECK(sticky_strerror(a) != NULL && strlen(sticky_strerror(a)) > 0, "code %d has no text", a);
        for (int b = STICKY_OK; b < a; b++) {
            CHECK(strcmp(sticky_strerror(a), sticky_strerror(b)) != 0, "codes %d and %d share a text", a, b);
        }
    }
    CHECK(strstr(sticky_strerror(1000), "unknown") != NULL, "%s", sticky_strerror(1000));
    CHECK(strstr(sticky_strerror(-1), "unknown") != NULL, "%s", sticky_strerror(-1));
}

static void null_arguments(void) {
    CHECK(sticky_worker_open(NULL) == STICKY_EINVAL, "open(NULL)");
    CHECK(sticky_worker_index(NULL) == -1, "index(NULL)");
    CHECK(sticky_worker_concurrency(NULL) == -1, "concurrency(NULL)");
    CHECK(sticky_worker_fd(NULL) == -1, "fd(NULL)");
    CHECK(sticky_worker_ready(NULL) == STICKY_EINVAL, "ready(NULL)");
    CHECK(sticky_worker_shutdown_deadline_ms(NULL) == -1, "deadline(NULL)");
    int conn = -7;
    CHECK(sticky_worker_accept(NULL, &conn, NULL, NULL) == STICKY_EINVAL && conn == -7, "accept(NULL)");
    CHECK(strcmp(sticky_last_error_message(), "worker must not be NULL") == 0, "%s", sticky_last_error_message());
    sticky_worker_close(NULL);
    sticky_options_init(NULL);
    CHECK(sticky_run(NULL, NULL, NULL) == STICKY_EINVAL, "run without serve");
    CHECK(sticky_run_config(NULL, never_serve, NULL) == STICKY_EINVAL, "run_config without a path");
    CHECK(serve_calls == 0, "serve was called");
    CHECK(sticky_worker_stop_accepting(NULL) == STICKY_EINVAL, "stop_accepting(NULL)");

    /* The cluster handle: every call checks it, out-pointers stay untouched on failure. */
    sticky_cluster *cluster = (sticky_cluster *)0x1;
    sticky_options options;
    sticky_options_init(&options);
    CHECK(sticky_cluster_start(&options, NULL) == STICKY_EINVAL, "start without out");
    CHECK(sticky_cluster_start_config(NULL, &cluster) == STICKY_EINVAL && cluster == (sticky_cluster *)0x1,
          "start_config without a path");
    CHECK(sticky_cluster_port(NULL) == -1, "port(NULL)");
    CHECK(sticky_cluster_reload(NULL, &options) == STICKY_EINVAL, "reload(NULL)");
    CHECK(strcmp(sticky_last_error_message(), "cluster must not be NULL") == 0, "%s", sticky_last_error_message());
    CHECK(sticky_cluster_reload_config(NULL, "x.yaml") == STICKY_EINVAL, "reload_config(NULL)");
    CHECK(sticky_cluster_stop(NULL, false) == STICKY_EINVAL, "stop(NULL)");
    CHECK(sticky_cluster_wait(NULL) == STICKY_EINVAL, "wait(NULL)");
    sticky_cluster_free(NULL);
    CHECK(!sticky_in_worker(), "in_worker without a worker environment");
}

static void missing_environment(void) {
    clear_worker_env();
    unsetenv("STICKY_CLUSTER_SOCKET");
    sticky_worker *worker = (sticky_worker *)0x1;
    int rc = sticky_worker_open(&worker);
    CHECK(rc == STICKY_ENOTWORKER, "open without environment gave %d", rc);
    CHECK(worker == (sticky_worker *)0x1, "out was written on failure");
    CHECK(strstr(sticky_last_error_message(), "STICKY_CLUSTER_FD") != NULL, "%s", sticky_last_error_message());

    set_worker_env("abc", "0");
    CHECK(sticky_worker_open(&worker) == STICKY_ENOTWORKER, "STICKY_CLUSTER_FD=abc");
    CHECK(strstr(sticky_last_error_message(), "not a file descriptor number") != NULL, "%s",
          sticky_last_error_message());

    int file = open("/dev/null", O_RDONLY | O_CLOEXEC);
    char number[16];
    snprintf(number, sizeof number, "%d", file);
    set_worker_env(number, "0");
    CHECK(sticky_worker_open(&worker) == STICKY_ENOTWORKER, "a file as channel");
    CHECK(strstr(sticky_last_error_message(), "not a socket") != NULL, "%s", sticky_last_error_message());
    close(file);

    int pair[2];
    socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair);
    snprintf(number, sizeof number, "%d", pair[1]);
    set_worker_env(number, NULL);
    CHECK(sticky_worker_open(&worker) == STICKY_ENOTWORKER, "no index");
    CHECK(strstr(sticky_last_error_message(), "STICKY_CLUSTER_WORKER_INDEX") != NULL, "%s",
          sticky_last_error_message());
    close(pair[0]);
    close(pair[1]);

    /* A program that is a worker starts no cluster of its own. */
    set_worker_env("abc", "0");
    CHECK(sticky_in_worker(), "in_worker with STICKY_CLUSTER_FD set");
    sticky_cluster *cluster = (sticky_cluster *)0x1;
    CHECK(sticky_cluster_start(NULL, &cluster) == STICKY_EINVAL && cluster == (sticky_cluster *)0x1,
          "start in a worker");
    CHECK(strstr(sticky_last_error_message(), "is a sticky-cluster worker") != NULL, "%s", sticky_last_error_message());
    clear_worker_env();

    /* sticky_run in a worker environment that is wrong: an error, and serve is never called. */
    set_worker_env("abc", "0");
    CHECK(sticky_run(NULL, never_serve, NULL) == STICKY_ENOTWORKER, "run with a bad worker environment");
    CHECK(serve_calls == 0, "serve was called");
    CHECK(worker == (sticky_worker *)0x1, "out was written on failure");
    clear_worker_env();
}

static void closed_channel(void) {
    int pair[2];
    CHECK(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) == 0, "socketpair");
    char number[16];
    snprintf(number, sizeof number, "%d", pair[1]);
    set_worker_env(number, "2");
    sticky_worker *worker = NULL;
    int rc = sticky_worker_open(&worker);
    clear_worker_env();
    CHECK(rc == STICKY_OK && worker != NULL, "open on a socketpair gave %d: %s", rc, sticky_last_error_message());
    if (worker == NULL) {
        return;
    }
    CHECK(sticky_worker_index(worker) == 2, "index %d", sticky_worker_index(worker));
    CHECK(sticky_worker_concurrency(worker) == 3, "concurrency %d", sticky_worker_concurrency(worker));
    CHECK(sticky_worker_fd(worker) == pair[1], "fd %d", sticky_worker_fd(worker));
    CHECK(sticky_worker_shutdown_deadline_ms(worker) == -1, "deadline before shutdown");
    unsigned char hello[64];
    ssize_t got = recv(pair[0], hello, sizeof hello, MSG_DONTWAIT);
    CHECK(got == 12 && hello[0] == 'S' && hello[1] == 'C' && hello[3] == 1 && hello[4] == 2,
          "hello message of %zd bytes", got);
    CHECK(sticky_worker_ready(worker) == STICKY_OK, "ready");
    got = recv(pair[0], hello, sizeof hello, MSG_DONTWAIT);
    CHECK(got == 4 && hello[3] == 2, "ready message of %zd bytes", got);

    int flags = fcntl(pair[1], F_GETFL);
    fcntl(pair[1], F_SETFL, flags | O_NONBLOCK);
    int conn = -7;
    struct sockaddr_storage peer;
    socklen_t peer_len = 12345;
    rc = sticky_worker_accept(worker, &conn, &peer, &peer_len);
    CHECK(rc == STICKY_EAGAIN && conn == -7 && peer_len == 12345, "non-blocking accept gave %d", rc);
    CHECK(sticky_last_os_error() == EAGAIN, "os error %d", sticky_last_os_error());
    CHECK(sticky_worker_accept(worker, NULL, NULL, NULL) == STICKY_EINVAL, "accept without conn_fd");
    fcntl(pair[1], F_SETFL, flags);

    close(pair[0]);
    rc = sticky_worker_accept(worker, &conn, &peer, &peer_len);
    CHECK(rc == STICKY_ECLOSED && conn == -7, "accept on a closed channel gave %d", rc);
    CHECK(strstr(sticky_last_error_message(), "closed") != NULL, "%s", sticky_last_error_message());
    sticky_worker_close(worker);
    CHECK(fcntl(pair[1], F_GETFD) == -1 && errno == EBADF, "close left the channel open");
}

static void bad_configuration(void) {
    sticky_options options;
    sticky_options_init(&options);
    CHECK(options.port == 8080 && options.concurrency >= 1 && strcmp(options.host, "::") == 0 &&
              strcmp(options.prefix, "sticky-cluster:") == 0 && options.hard_shutdown_delay_ms == 60000 &&
              options.queue_limit == 1024 && options.queue_max_wait_ms == 10000 && options.env == NULL &&
              options.worker_command == NULL && !options.debug && options.backlog == 1024,
          "defaults");
    /* Loopback and port 0: an option that slipped through would bind nothing anyone else needs. */
    options.host = "127.0.0.1";
    options.port = 0;
    options.backlog = 0;
    CHECK(sticky_run(&options, never_serve, NULL) == STICKY_ECONFIG, "backlog 0");
    CHECK(strcmp(sticky_last_error_message(), "sticky_options.backlog: must be at least 1, got 0") == 0, "%s",
          sticky_last_error_message());
    options.backlog = 1024;
    options.concurrency = 0;
    CHECK(sticky_run(&options, never_serve, NULL) == STICKY_ECONFIG, "concurrency 0");
    CHECK(strcmp(sticky_last_error_message(), "sticky_options.concurrency: must be at least 1, got 0") == 0, "%s",
          sticky_last_error_message());
    /* 4000000000 workers used to abort the master inside sticky_run, and this process with it (exit 134). */
    options.concurrency = 4000000000u;
    CHECK(sticky_run(&options, never_serve, NULL) == STICKY_ECONFIG, "concurrency 4000000000");
    CHECK(strcmp(sticky_last_error_message(), "sticky_options.concurrency: must be at most 1024, got 4000000000") == 0,
          "%s", sticky_last_error_message());
    options.concurrency = 1;
    options.hard_shutdown_delay_ms = 2147483648u;
    CHECK(sticky_run(&options, never_serve, NULL) == STICKY_ECONFIG, "hard_shutdown_delay_ms 2^31");
    CHECK(strcmp(sticky_last_error_message(),
                 "sticky_options.hard_shutdown_delay_ms: must be at most 2147483647, got 2147483648") == 0,
          "%s", sticky_last_error_message());
    options.hard_shutdown_delay_ms = 60000;
    sticky_cluster *cluster = (sticky_cluster *)0x1;
    options.concurrency = 4000000000u;
    CHECK(sticky_cluster_start(&options, &cluster) == STICKY_ECONFIG && cluster == (sticky_cluster *)0x1,
          "sticky_cluster_start with concurrency 4000000000");
    CHECK(strcmp(sticky_last_error_message(), "sticky_options.concurrency: must be at most 1024, got 4000000000") == 0,
          "%s", sticky_last_error_message());
    options.concurrency = 1;
    options.queue_limit = 0;
    CHECK(sticky_run(&options, never_serve, NULL) == STICKY_ECONFIG, "queue_limit 0");
    CHECK(strcmp(sticky_last_error_message(), "sticky_options.queue_limit: must be at least 1, got 0") == 0, "%s",
          sticky_last_error_message());

    sticky_options_init(&options);
    const char *env[] = {"GOOD=1", "broken", NULL};
    options.env = env;
    CHECK(sticky_run(&options, never_serve, NULL) == STICKY_ECONFIG, "env without =");
    CHECK(strstr(sticky_last_error_message(), "\"broken\" is not KEY=VALUE") != NULL, "%s",
          sticky_last_error_message());

    sticky_options_init(&options);
    const char *empty_command[] = {NULL};
    options.worker_command = empty_command;
    CHECK(sticky_run(&options, never_serve, NULL) == STICKY_ECONFIG, "empty worker command");

    CHECK(sticky_run_config("/nonexistent/cluster.yaml", never_serve, NULL) == STICKY_ECONFIG, "missing file");
    CHECK(sticky_last_os_error() == ENOENT, "os error %d", sticky_last_os_error());
    CHECK(strstr(sticky_last_error_message(), "/nonexistent/cluster.yaml") != NULL, "%s",
          sticky_last_error_message());

    char path[] = "/tmp/sticky-errors-XXXXXX";
    int file = mkstemp(path);
    const char yaml[] = "port: 0\nconcurency: 4\n";
    CHECK(write(file, yaml, sizeof yaml - 1) == (ssize_t)(sizeof yaml - 1), "write yaml");
    close(file);
    CHECK(sticky_run_config(path, never_serve, NULL) == STICKY_ECONFIG, "misspelled key");
    CHECK(strstr(sticky_last_error_message(), ":2: unknown key `concurency`") != NULL, "%s",
          sticky_last_error_message());
    unlink(path);

    /* The same bound from a YAML file, with its line. */
    char bounds_path[] = "/tmp/sticky-errors-XXXXXX";
    file = mkstemp(bounds_path);
    const char bounds_yaml[] = "host: 127.0.0.1\nport: 0\nconcurrency: 4000000000\n";
    CHECK(write(file, bounds_yaml, sizeof bounds_yaml - 1) == (ssize_t)(sizeof bounds_yaml - 1), "write yaml");
    close(file);
    CHECK(sticky_run_config(bounds_path, never_serve, NULL) == STICKY_ECONFIG, "concurrency 4000000000 in YAML");
    char expected[128];
    snprintf(expected, sizeof expected, "%s:3: concurrency: must be at most 1024, got 4000000000", bounds_path);
    CHECK(strcmp(sticky_last_error_message(), expected) == 0, "%s", sticky_last_error_message());
    unlink(bounds_path);
    CHECK(serve_calls == 0, "serve was called");
}

static void address_in_use(void) {
    int taken = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_addr = {htonl(INADDR_LOOPBACK)}};
    socklen_t length = sizeof address;
    CHECK(bind(taken, (struct sockaddr *)&address, sizeof address) == 0 && listen(taken, 1) == 0 &&
              getsockname(taken, (struct sockaddr *)&address, &length) == 0,
          "reserve a port");
    sticky_options options;
    sticky_options_init(&options);
    options.host = "127.0.0.1";
    options.port = ntohs(address.sin_port);
    options.concurrency = 1;
    int rc = sticky_run(&options, never_serve, NULL);
    CHECK(rc == STICKY_ELISTEN, "port in use gave %d: %s", rc, sticky_last_error_message());
    CHECK(sticky_last_os_error() == EADDRINUSE, "os error %d", sticky_last_os_error());
    CHECK(strstr(sticky_last_error_message(), "cannot listen on 127.0.0.1:") != NULL, "%s",
          sticky_last_error_message());
    close(taken);
}

int main(void) {
    error_texts();
    null_arguments();
    missing_environment();
    closed_channel();
    bad_configuration();
    address_in_use();

    /* The last error is per thread: a failure elsewhere leaves this thread's message alone. */
    char before[256];
    snprintf(before, sizeof before, "%s", sticky_last_error_message());
    pthread_t thread;
    pthread_create(&thread, NULL, fail_in_another_thread, NULL);
    pthread_join(thread, NULL);
    CHECK(strcmp(before, sticky_last_error_message()) == 0, "main thread message changed to %s",
          sticky_last_error_message());

    printf("errors: %d checks, %d failed\n", checks, failures);
    return failures == 0 ? 0 : 1;
}
