/* A new-connection HTTPS load client for bench/tls_bench.py: C, OpenSSL, one epoll loop.
 *
 *     tls_newconn ADDRESS PORT NAME CONNECTIONS SECONDS
 *
 * Keeps CONNECTIONS connections in flight; each one is a new TCP connection, a full TLS
 * handshake (no session is ever offered: the context's session cache is off and every SSL is
 * new), one "GET / HTTP/1.1" with "Connection: close", the whole response read, then
 * close_notify and close, and the slot starts over. Prints one line:
 *
 *     requests N seconds S errors E resumed R
 *
 * Why not wrk for this: wrk 4.1 keeps a connection's fd registered for writability while
 * SSL_connect waits for the server's flight, so it spins on read() returning EAGAIN for as
 * long as a handshake is pending (measured ~1,200 read() per connection through
 * interception, ~300 spliced). On a 2-core machine the spin takes CPU from the very server it
 * waits on, in proportion to that server's latency. This client waits in epoll for exactly
 * what OpenSSL asked for (readable on WANT_READ, writable on WANT_WRITE).
 *
 * Certificates are not verified (like wrk and curl -k in the same bench): the client's cost
 * stays the same whichever server answers.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum state { CONNECTING, HANDSHAKE, WRITING, READING };

struct conn {
    int fd;
    SSL *ssl;
    enum state st;
    char buf[16384];
    size_t have;
};

static SSL_CTX *ctx;
static struct sockaddr_in addr;
static const char *name;
static char request[512];
static int ep;
static long requests, errors, resumed;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void watch(struct conn *c, uint32_t events, int op) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(ep, op, c->fd, &ev) < 0) {
        perror("epoll_ctl");
        exit(2);
    }
}

static void start(struct conn *c) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        perror("socket");
        exit(2);
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->ssl = NULL;
    c->have = 0;
    c->st = CONNECTING;
    if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
        perror("connect");
        exit(2);
    }
    watch(c, EPOLLOUT, EPOLL_CTL_ADD);
}

static void finish(struct conn *c, int ok) {
    if (c->ssl) {
        if (ok)
            SSL_shutdown(c->ssl); /* close_notify, as wrk sends; not waiting for the peer's */
        if (SSL_session_reused(c->ssl))
            resumed++;
        SSL_free(c->ssl);
    }
    close(c->fd); /* also removes it from the epoll set */
    if (ok)
        requests++;
    else
        errors++;
    ERR_clear_error();
    start(c);
}

/* What to wait for after an SSL call returned r <= 0; -1: the connection failed. */
static int wait_for(struct conn *c, int r) {
    switch (SSL_get_error(c->ssl, r)) {
    case SSL_ERROR_WANT_READ:
        watch(c, EPOLLIN, EPOLL_CTL_MOD);
        return 0;
    case SSL_ERROR_WANT_WRITE:
        watch(c, EPOLLOUT, EPOLL_CTL_MOD);
        return 0;
    default:
        return -1;
    }
}

/* The response is complete when its head and Content-Length bytes of body are in. */
static int complete(struct conn *c) {
    c->buf[c->have] = 0;
    char *end = strstr(c->buf, "\r\n\r\n");
    if (!end)
        return 0;
    if (strncmp(c->buf, "HTTP/1.1 200", 12) != 0)
        return -1;
    char *cl = strcasestr(c->buf, "\r\ncontent-length:");
    if (!cl || cl > end)
        return -1;
    size_t want = (size_t)(end + 4 - c->buf) + strtoul(cl + 17, NULL, 10);
    return c->have >= want ? 1 : 0;
}

static void step(struct conn *c) {
    int r;
    switch (c->st) {
    case CONNECTING: {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            finish(c, 0);
            return;
        }
        struct sockaddr_in peer;
        len = sizeof peer;
        if (getpeername(c->fd, (struct sockaddr *)&peer, &len) < 0)
            return; /* a stale event of this slot's previous connection: still connecting */
        c->ssl = SSL_new(ctx);
        SSL_set_fd(c->ssl, c->fd);
        SSL_set_tlsext_host_name(c->ssl, name);
        c->st = HANDSHAKE;
    } /* fall through */
    case HANDSHAKE:
        r = SSL_connect(c->ssl);
        if (r <= 0) {
            if (wait_for(c, r) < 0)
                finish(c, 0);
            return;
        }
        c->st = WRITING;
        /* fall through */
    case WRITING:
        r = SSL_write(c->ssl, request, (int)strlen(request));
        if (r <= 0) {
            if (wait_for(c, r) < 0)
                finish(c, 0);
            return;
        }
        c->st = READING;
        /* fall through */
    case READING:
        for (;;) {
            if (c->have >= sizeof c->buf - 1) {
                finish(c, 0);
                return;
            }
            r = SSL_read(c->ssl, c->buf + c->have, (int)(sizeof c->buf - 1 - c->have));
            if (r <= 0) {
                int done = complete(c);
                if (done != 0) {
                    finish(c, done > 0);
                } else if (wait_for(c, r) < 0) {
                    finish(c, 0);
                }
                return;
            }
            c->have += (size_t)r;
            int done = complete(c);
            if (done != 0) {
                finish(c, done > 0);
                return;
            }
        }
    }
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s ADDRESS PORT NAME CONNECTIONS SECONDS\n", argv[0]);
        return 2;
    }
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1) {
        fprintf(stderr, "not an IPv4 address: %s\n", argv[1]);
        return 2;
    }
    name = argv[3];
    int n = atoi(argv[4]);
    double seconds = atof(argv[5]);
    snprintf(request, sizeof request,
             "GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", name);

    ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    static const unsigned char alpn[] = "\x08http/1.1";
    SSL_CTX_set_alpn_protos(ctx, alpn, sizeof alpn - 1);

    ep = epoll_create1(EPOLL_CLOEXEC);
    struct conn *conns = calloc((size_t)n, sizeof *conns);
    for (int i = 0; i < n; i++)
        start(&conns[i]);
    double t0 = now(), end = t0 + seconds;
    struct epoll_event evs[256];
    while (now() < end) {
        int k = epoll_wait(ep, evs, 256, 100);
        for (int i = 0; i < k; i++)
            step(evs[i].data.ptr);
    }
    printf("requests %ld seconds %.3f errors %ld resumed %ld\n", requests, now() - t0, errors,
           resumed);
    return 0;
}
