/* sticky_client: connects from ADDRESSES loopback source addresses 127.0.x.y, ROUNDS times each, to a
 * cluster on 127.0.0.1:PORT, and checks every answer came from worker string_hash("::ffff:127.0.x.y")
 * % CONCURRENCY (npm string-hash: 5381, h = h*33 ^ c from the last character to the first), that the
 * worker echoes that address, that one index is always one pid, and that every index served someone.
 * Usage: sticky_client PORT CONCURRENCY ADDRESSES ROUNDS */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "http_client.h"

static uint32_t string_hash(const char *text) {
    uint32_t hash = 5381;
    for (size_t i = strlen(text); i > 0; i--) {
        hash = (hash * 33u) ^ (uint32_t)(unsigned char)text[i - 1];
    }
    return hash;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s PORT CONCURRENCY ADDRESSES ROUNDS\n", argv[0]);
        return 2;
    }
    int port = atoi(argv[1]), concurrency = atoi(argv[2]), addresses = atoi(argv[3]), rounds = atoi(argv[4]);
    if (concurrency < 1 || concurrency > 64 || addresses < 1 || addresses > 25000 || rounds < 1) {
        fprintf(stderr, "sticky_client: bad arguments\n");
        return 2;
    }
    long pid_of[64] = {0};
    int served_by[64] = {0};
    int failures = 0, requests = 0;
    for (int round = 0; round < rounds; round++) {
        for (int i = 0; i < addresses; i++) {
            char source[32], mapped[48], answer[4096];
            snprintf(source, sizeof source, "127.0.%d.%d", 1 + i / 250, 1 + i % 250);
            snprintf(mapped, sizeof mapped, "::ffff:%s", source);
            int expected = (int)(string_hash(mapped) % (uint32_t)concurrency);
            requests++;
            if (http_get(source, port, 10, answer, sizeof answer) == 0) {
                fprintf(stderr, "FAIL %s: no answer\n", source);
                failures++;
                continue;
            }
            const char *body = strstr(answer, "\r\n\r\n");
            int worker = -1;
            long pid = -1;
            char remote[64] = "";
            if (body == NULL || !strstr(answer, "HTTP/1.1 200 OK") ||
                sscanf(body + 4, "{\"worker\":%d,\"pid\":%ld,\"remote\":\"%63[^\"]\"}", &worker, &pid, remote) != 3) {
                fprintf(stderr, "FAIL %s: unexpected answer %s\n", source, answer);
                failures++;
                continue;
            }
            if (worker != expected || strcmp(remote, mapped) != 0) {
                fprintf(stderr, "FAIL %s: answered by worker %d for remote %s, expected worker %d for %s\n",
                        source, worker, remote, expected, mapped);
                failures++;
                continue;
            }
            if (pid_of[worker] == 0) {
                pid_of[worker] = pid;
            } else if (pid_of[worker] != pid) {
                fprintf(stderr, "FAIL %s: worker %d answered from pid %ld and pid %ld\n", source, worker,
                        pid_of[worker], pid);
                failures++;
            }
            served_by[worker]++;
        }
    }
    for (int index = 0; index < concurrency; index++) {
        if (served_by[index] == 0) {
            fprintf(stderr, "FAIL worker %d served no request\n", index);
            failures++;
        }
    }
    printf("sticky_client: %d requests from %d addresses x %d rounds, %d failures; per worker:", requests,
           addresses, rounds, failures);
    for (int index = 0; index < concurrency; index++) {
        printf(" %d", served_by[index]);
    }
    printf("\n");
    return failures == 0 ? 0 : 1;
}
