/* openloop: an open-loop HTTP/1.1 load generator, one new connection per request.
 *
 * wrk paces with delay(): each connection waits after a response before its next request, so
 * the offered rate falls whenever the server slows down, and a slower server is never asked
 * for more than it gives. That hides exactly what a fixed-rate budget asks about. openloop
 * starts request i at t0 + i / rate whatever happened to earlier requests, and measures each
 * latency from that scheduled start, so time a request spent waiting for the generator or for
 * a connection counts (no coordinated omission).
 *
 *   openloop HOST PORT PATH RATE SECONDS [MAX_INFLIGHT]
 *
 * Prints one JSON object on stdout: scheduled, completed, errors, non_2xx, skipped (arrivals
 * dropped because MAX_INFLIGHT requests were already open: the server could not keep up),
 * late_ms_max (how far the generator itself fell behind its schedule), rps, and latency
 * percentiles in ms. Connection: close is sent, as a gunicorn sync worker closes anyway.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define RESP_MAX 65536

struct req {
    int fd;
    int sent;          /* bytes of the request written */
    int got;           /* bytes of the response read */
    uint64_t sched_ns; /* when this request was due */
    char buf[RESP_MAX];
};

static char request[1024];
static int request_len;
static struct sockaddr_in target;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Whether buf holds a whole response: the head and, if it names one, a Content-Length body.
 * Without a length the response ends when the server closes. Sets *status. */
static int response_complete(const char *buf, int len, int *status)
{
    const char *end = memmem(buf, (size_t)len, "\r\n\r\n", 4);
    if (!end)
        return 0;
    if (len >= 12 && memcmp(buf, "HTTP/1.", 7) == 0)
        *status = atoi(buf + 9);
    int head = (int)(end - buf) + 4;
    const char *p = buf;
    while (p < end) {
        const char *eol = memmem(p, (size_t)(end - p), "\r\n", 2);
        if (!eol)
            break;
        if (eol - p > 15 && strncasecmp(p, "content-length:", 15) == 0)
            return len >= head + atoi(p + 15);
        p = eol + 2;
    }
    return 0;
}

static double pct(const uint64_t *v, size_t n, double q)
{
    if (!n)
        return -1;
    size_t i = (size_t)(q * (double)(n - 1) + 0.5);
    return (double)v[i] / 1e6;
}

int main(int argc, char **argv)
{
    if (argc < 6) {
        fprintf(stderr, "usage: %s HOST PORT PATH RATE SECONDS [MAX_INFLIGHT]\n", argv[0]);
        return 2;
    }
    double rate = atof(argv[4]), seconds = atof(argv[5]);
    int max_inflight = argc > 6 ? atoi(argv[6]) : 512;
    if (rate <= 0 || seconds <= 0 || max_inflight <= 0) {
        fprintf(stderr, "openloop: RATE, SECONDS and MAX_INFLIGHT must be positive\n");
        return 2;
    }
    memset(&target, 0, sizeof(target));
    target.sin_family = AF_INET;
    target.sin_port = htons((uint16_t)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &target.sin_addr) != 1) {
        fprintf(stderr, "openloop: HOST must be an IPv4 address, got %s\n", argv[1]);
        return 2;
    }
    request_len = snprintf(request, sizeof(request),
                           "GET %s HTTP/1.1\r\nHost: %s:%s\r\nConnection: close\r\n\r\n",
                           argv[3], argv[1], argv[2]);

    size_t total = (size_t)(rate * seconds);
    uint64_t *lat = calloc(total ? total : 1, sizeof(*lat));
    struct req *slots = calloc((size_t)max_inflight, sizeof(*slots));
    int *free_list = calloc((size_t)max_inflight, sizeof(int));
    if (!lat || !slots || !free_list) {
        fprintf(stderr, "openloop: out of memory\n");
        return 1;
    }
    int nfree = max_inflight;
    for (int i = 0; i < max_inflight; i++)
        free_list[i] = max_inflight - 1 - i;

    int ep = epoll_create1(EPOLL_CLOEXEC);
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    uint64_t interval = (uint64_t)(1e9 / rate);
    uint64_t t0 = now_ns() + 1000000;
    struct itimerspec its = {
        .it_value = {.tv_sec = (time_t)(t0 / 1000000000ull), .tv_nsec = (long)(t0 % 1000000000ull)},
        .it_interval = {.tv_sec = (time_t)(interval / 1000000000ull),
                        .tv_nsec = (long)(interval % 1000000000ull)},
    };
    timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
    struct epoll_event tev = {.events = EPOLLIN, .data.u64 = UINT64_MAX};
    epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &tev);

    size_t scheduled = 0, completed = 0, errors = 0, non2xx = 0, skipped = 0;
    uint64_t late_max = 0, last_done = t0;
    int inflight = 0;
    struct epoll_event evs[256];
    for (;;) {
        if (scheduled >= total && inflight == 0)
            break;
        int n = epoll_wait(ep, evs, 256, 1000);
        if (n < 0 && errno != EINTR) {
            perror("openloop: epoll_wait");
            return 1;
        }
        for (int e = 0; e < n; e++) {
            if (evs[e].data.u64 == UINT64_MAX) {
                uint64_t ticks = 0;
                if (read(tfd, &ticks, sizeof(ticks)) != sizeof(ticks))
                    continue;
                uint64_t now = now_ns();
                for (uint64_t t = 0; t < ticks && scheduled < total; t++) {
                    uint64_t due = t0 + scheduled * interval;
                    scheduled++;
                    if (now - due > late_max && now > due)
                        late_max = now - due;
                    if (!nfree) {
                        skipped++;
                        continue;
                    }
                    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
                    if (fd < 0) {
                        errors++;
                        continue;
                    }
                    int one = 1;
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
                    if (connect(fd, (struct sockaddr *)&target, sizeof(target)) < 0 &&
                        errno != EINPROGRESS) {
                        close(fd);
                        errors++;
                        continue;
                    }
                    int s = free_list[--nfree];
                    slots[s].fd = fd;
                    slots[s].sent = 0;
                    slots[s].got = 0;
                    slots[s].sched_ns = due;
                    struct epoll_event ev = {.events = EPOLLOUT, .data.u64 = (uint64_t)s};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
                    inflight++;
                }
                if (scheduled >= total) {
                    struct itimerspec off = {0};
                    timerfd_settime(tfd, 0, &off, NULL);
                }
                continue;
            }
            int s = (int)evs[e].data.u64;
            struct req *r = &slots[s];
            int done = 0, failed = 0, status = 0;
            if (r->sent < request_len) {
                ssize_t w = send(r->fd, request + r->sent, (size_t)(request_len - r->sent),
                                 MSG_NOSIGNAL);
                if (w < 0 && errno != EAGAIN) {
                    failed = 1;
                } else if (w > 0) {
                    r->sent += (int)w;
                    if (r->sent == request_len) {
                        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)s};
                        epoll_ctl(ep, EPOLL_CTL_MOD, r->fd, &ev);
                    }
                }
            } else {
                ssize_t got = recv(r->fd, r->buf + r->got, (size_t)(RESP_MAX - 1 - r->got), 0);
                if (got < 0 && errno != EAGAIN) {
                    failed = 1;
                } else if (got == 0 || r->got + got >= RESP_MAX - 1) {
                    done = 1; /* the server closed (or the response fills the buffer) */
                    response_complete(r->buf, r->got, &status);
                    if (!status)
                        failed = 1;
                } else if (got > 0) {
                    r->got += (int)got;
                    done = response_complete(r->buf, r->got, &status);
                }
            }
            if (done || failed) {
                uint64_t t = now_ns();
                if (failed) {
                    errors++;
                } else {
                    if (status < 200 || status > 299)
                        non2xx++;
                    if (completed < total)
                        lat[completed++] = t - r->sched_ns;
                    last_done = t;
                }
                epoll_ctl(ep, EPOLL_CTL_DEL, r->fd, NULL);
                close(r->fd);
                free_list[nfree++] = s;
                inflight--;
            }
        }
    }
    qsort(lat, completed, sizeof(*lat), cmp_u64);
    double wall = (double)(last_done - t0) / 1e9;
    printf("{\"scheduled\": %zu, \"completed\": %zu, \"errors\": %zu, \"non_2xx\": %zu, "
           "\"skipped\": %zu, \"late_ms_max\": %.3f, \"rps\": %.1f, \"p50_ms\": %.3f, "
           "\"p90_ms\": %.3f, \"p99_ms\": %.3f, \"p999_ms\": %.3f, \"max_ms\": %.3f}\n",
           scheduled, completed, errors, non2xx, skipped, (double)late_max / 1e6,
           wall > 0 ? (double)completed / wall : 0.0, pct(lat, completed, 0.50),
           pct(lat, completed, 0.90), pct(lat, completed, 0.99), pct(lat, completed, 0.999),
           completed ? (double)lat[completed - 1] / 1e6 : -1.0);
    return 0;
}
