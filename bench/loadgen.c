/* loadgen: single-threaded epoll load generator for HTTP CONNECT proxies.
 * Loopback only (every resolved address is checked); every run is bounded
 * in time (ramp + duration + grace) and count.
 *
 * usage: loadgen -m MODE (-x PROXY_HOST:PORT | -D) -t TARGET_HOST:PORT
 *                [-u USER[:PASS]] [-c CONC] [-d SECONDS] [-r RAMP_S]
 *                [-n BYTES] [-s SNI] [-T OP_TIMEOUT_S] [-i MAX_INFLIGHT]
 *                [-H HELLO_OUT_FILE] [-A AUTHORITY] [-S CAFILE] [-N] [-q]
 *        loadgen -V   (features: built with TLS or not, OpenSSL version; JSON)
 *
 * modes:
 *   rate      CONNECT -> 200 -> send N bytes -> read echo -> close; repeat
 *   tls-rate  same, payload is a fixed TLS ClientHello record with SNI
 *   bulk      CONC tunnels stream to a sink for the duration (MB/s up)
 *   bulk-down CONC tunnels read from a source for the duration (MB/s down)
 *   idle      open CONC tunnels (one 16-byte echo each), print "READY n",
 *             hold them idle for -d seconds, then re-check each with an echo
 * -D (direct): connect straight to the target, no proxy (baseline).
 * -A (proxy mode only): send AUTHORITY (e.g. bench.example.com:19001) as the
 *    CONNECT target instead of -t; the proxy resolves it (egress-guard maps it
 *    to 127.0.0.1 with HOSTS_FILE). -t must still be a loopback address: it is
 *    what the name stands for. loadgen itself only ever connects to -x.
 * -S (proxy mode only): speak TLS to the proxy (an https:// proxy): after the TCP
 *    connect, a non-blocking TLS handshake verifying the proxy's certificate
 *    against CAFILE and the -x host (IP SAN for an address, DNS name otherwise);
 *    then CONNECT, its answer and every mode's bytes go through the session.
 *    Every connection makes a full handshake: no session is resumed (what Go's
 *    and Python's clients do by default; curl resumes within one process).
 *    Needs a build with -DLOADGEN_TLS (-lssl -lcrypto); without it -S exits 2.
 * -N (proxy mode only): a new request head for every connection (an X-Seq header
 *    with a counter), so a proxy that remembers heads it has seen never sees one twice.
 * Output: one JSON object on the last stdout line.
 */
#include "common.h"
#include <math.h>
#include <signal.h>
#include <sys/epoll.h>
#ifdef LOADGEN_TLS
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#endif

enum mode { M_RATE, M_TLS, M_BULK, M_BULKDOWN, M_IDLE };
static const char *mode_names[] = {"rate", "tls-rate", "bulk", "bulk-down", "idle"};

enum st {
    S_FREE, S_BACKOFF, S_CONNECTING, S_HANDSHAKE, S_SEND_REQ, S_READ_RESP, S_SEND_PAY,
    S_READ_ECHO, S_IDLE, S_DONE, S_STREAM_UP, S_STREAM_DOWN
};

enum err { E_CONNECT, E_STATUS, E_CLOSED, E_TIMEOUT, E_MISMATCH, E_IO, E_PROTO, E_NERR };
static const char *err_names[] = {"connect", "status", "closed", "timeout", "mismatch", "io", "proto"};

#define HBUF 1024
#define BULK_CHUNK (256 * 1024)
#define MAX_STEPS 16
#define MAX_SAMPLES (20u * 1000u * 1000u)
#define SCRATCH (64 * 1024) /* bulk-down through TLS: decrypted bytes land here */

struct conn {
    int fd;
    uint32_t gen;
    uint8_t state;
    uint8_t queued;
    uint8_t final_check; /* idle mode: second echo */
    uint8_t pending;     /* counted in n_pending (not yet established) */
    uint64_t t0, tdl;
    uint32_t off, hlen;
    char hbuf[HBUF];
    char *req;      /* -N: this connection's own request head (else the shared one) */
    uint32_t reqlen;
    uint8_t *rbuf;
#ifdef LOADGEN_TLS
    SSL *ssl; /* the session with the proxy (-S), NULL otherwise */
#endif
};

/* config */
static int mode = -1, direct = 0, quiet = 0;
static struct sockaddr_storage dst_addr; /* proxy, or target when direct */
static socklen_t dst_len;
static char target_str[300];
static const char *authority = NULL;
static int conc = 64;
static double duration = 5.0, ramp = 0.5, op_timeout = 5.0;
static int plen = 64, max_inflight = 256;
static const char *sni = "api.example.com";
static int new_heads = 0;          /* -N */
static unsigned long head_seq = 0; /* -N: the X-Seq of the next head */
static char auth_line[600] = "";   /* Proxy-Authorization line, or empty */
static char *user = NULL;
static const char *tls_ca = NULL; /* -S: TLS to the proxy, verified against this CA file */

/* state */
static struct conn *conns;
static int ep;
static char *req;
static size_t reqlen;
static uint8_t *payload;
static uint8_t *bulkbuf;
static int *readyq, nready;
static int n_pending;
static uint64_t win_start, win_end;
static uint64_t ok_count, errors[E_NERR], bytes_total, bytes_at_win;
static int bytes_snap_done;
static uint64_t *samples;
static size_t nsamples, cap_samples;
static char last_error[200];
static uint64_t established, alive, attempts, done_all;
static int idle_phase; /* 1 establish, 2 hold, 3 final check */
static uint8_t *scratch;
static uint64_t hs_count, hs_ns; /* TLS handshakes completed, their time since the TCP connect began */
static char tls_why[160];        /* the last TLS failure, in OpenSSL's words */
#ifdef LOADGEN_TLS
static SSL_CTX *tls_ctx;
static char proxy_host[256];
static char tls_version[32], tls_cipher[64];
#define TLS_VERSION_NAME tls_version
#define TLS_CIPHER_NAME tls_cipher
#else
#define TLS_VERSION_NAME ""
#define TLS_CIPHER_NAME ""
#endif

static void record_latency(uint64_t ns) {
    if (nsamples == cap_samples) {
        if (cap_samples >= MAX_SAMPLES) return;
        size_t nc = cap_samples ? cap_samples * 2 : 65536;
        uint64_t *ns2 = realloc(samples, nc * sizeof *samples);
        if (!ns2) return;
        samples = ns2;
        cap_samples = nc;
    }
    samples[nsamples++] = ns;
}

static void b64(const char *in, char *out) {
    static const char *t = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t n = strlen(in), i = 0;
    char *o = out;
    for (; i + 2 < n; i += 3) {
        uint32_t v = ((uint8_t)in[i] << 16) | ((uint8_t)in[i + 1] << 8) | (uint8_t)in[i + 2];
        *o++ = t[v >> 18]; *o++ = t[(v >> 12) & 63]; *o++ = t[(v >> 6) & 63]; *o++ = t[v & 63];
    }
    if (n - i == 1) {
        uint32_t v = (uint8_t)in[i] << 16;
        *o++ = t[v >> 18]; *o++ = t[(v >> 12) & 63]; *o++ = '='; *o++ = '=';
    } else if (n - i == 2) {
        uint32_t v = ((uint8_t)in[i] << 16) | ((uint8_t)in[i + 1] << 8);
        *o++ = t[v >> 18]; *o++ = t[(v >> 12) & 63]; *o++ = t[(v >> 6) & 63]; *o++ = '=';
    }
    *o = 0;
}

/* ---- TLS ClientHello (Chrome-like, TLS 1.3 + 1.2, BoringSSL-style padding) ---- */
static uint32_t rng_state = 0x9e3779b9u;
static uint8_t rnd8(void) {
    rng_state ^= rng_state << 13; rng_state ^= rng_state >> 17; rng_state ^= rng_state << 5;
    return (uint8_t)rng_state;
}
#define PUT16(p, v) do { (p)[0] = (uint8_t)((v) >> 8); (p)[1] = (uint8_t)(v); (p) += 2; } while (0)

static size_t build_client_hello(uint8_t *o, const char *name) {
    uint8_t *p = o;
    size_t sl = strlen(name);
    if (sl > 253) sl = 253;
    *p++ = 0x16; *p++ = 0x03; *p++ = 0x01; /* record: handshake, legacy 1.0 */
    uint8_t *reclen = p; p += 2;
    uint8_t *hs = p;
    *p++ = 0x01; /* ClientHello */
    uint8_t *hslen = p; p += 3;
    *p++ = 0x03; *p++ = 0x03; /* legacy_version TLS 1.2 */
    for (int i = 0; i < 32; i++) *p++ = rnd8();  /* random */
    *p++ = 32;
    for (int i = 0; i < 32; i++) *p++ = rnd8();  /* legacy_session_id */
    static const uint16_t suites[] = {0x1301, 0x1302, 0x1303, 0xc02b, 0xc02f, 0xc02c, 0xc030,
                                      0xcca9, 0xcca8, 0xc013, 0xc014, 0x009c, 0x009d, 0x002f, 0x0035};
    int ns = (int)(sizeof suites / sizeof suites[0]);
    PUT16(p, ns * 2);
    for (int i = 0; i < ns; i++) PUT16(p, suites[i]);
    *p++ = 1; *p++ = 0; /* compression: null */
    uint8_t *extlen = p; p += 2;
    uint8_t *ext0 = p;
    /* server_name */
    PUT16(p, 0x0000); PUT16(p, sl + 5); PUT16(p, sl + 3); *p++ = 0; PUT16(p, sl);
    memcpy(p, name, sl); p += sl;
    PUT16(p, 0x0017); PUT16(p, 0);                 /* extended_master_secret */
    PUT16(p, 0xff01); PUT16(p, 1); *p++ = 0;       /* renegotiation_info */
    PUT16(p, 0x000a); PUT16(p, 8); PUT16(p, 6);    /* supported_groups */
    PUT16(p, 0x001d); PUT16(p, 0x0017); PUT16(p, 0x0018);
    PUT16(p, 0x000b); PUT16(p, 2); *p++ = 1; *p++ = 0; /* ec_point_formats */
    PUT16(p, 0x0023); PUT16(p, 0);                 /* session_ticket */
    PUT16(p, 0x0010); PUT16(p, 14); PUT16(p, 12);  /* ALPN h2, http/1.1 */
    *p++ = 2; memcpy(p, "h2", 2); p += 2;
    *p++ = 8; memcpy(p, "http/1.1", 8); p += 8;
    PUT16(p, 0x0005); PUT16(p, 5); *p++ = 1; PUT16(p, 0); PUT16(p, 0); /* status_request */
    static const uint16_t sigs[] = {0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601};
    PUT16(p, 0x000d); PUT16(p, 2 + 16); PUT16(p, 16);  /* signature_algorithms */
    for (int i = 0; i < 8; i++) PUT16(p, sigs[i]);
    PUT16(p, 0x0012); PUT16(p, 0);                 /* signed_certificate_timestamp */
    PUT16(p, 0x0033); PUT16(p, 38); PUT16(p, 36);  /* key_share: x25519 */
    PUT16(p, 0x001d); PUT16(p, 32);
    for (int i = 0; i < 32; i++) *p++ = rnd8();
    PUT16(p, 0x002d); PUT16(p, 2); *p++ = 1; *p++ = 1;  /* psk_key_exchange_modes */
    PUT16(p, 0x002b); PUT16(p, 5); *p++ = 4;        /* supported_versions 1.3, 1.2 */
    PUT16(p, 0x0304); PUT16(p, 0x0303);
    size_t cur = (size_t)(p - hs);
    if (cur > 0xff && cur < 0x200) { /* padding ext (RFC 7685), as BoringSSL does */
        size_t pad = 0x200 - cur;
        pad = pad >= 5 ? pad - 4 : 1;
        PUT16(p, 0x0015); PUT16(p, pad);
        memset(p, 0, pad); p += pad;
    }
    size_t el = (size_t)(p - ext0);
    extlen[0] = (uint8_t)(el >> 8); extlen[1] = (uint8_t)el;
    size_t hl = (size_t)(p - hs) - 4;
    hslen[0] = (uint8_t)(hl >> 16); hslen[1] = (uint8_t)(hl >> 8); hslen[2] = (uint8_t)hl;
    size_t rl = (size_t)(p - hs);
    reclen[0] = (uint8_t)(rl >> 8); reclen[1] = (uint8_t)rl;
    return (size_t)(p - o);
}

/* ---- TLS to the proxy (-S) ---- */
#ifdef LOADGEN_TLS
/* The client context: TLS 1.2 or later, the peer verified against CAFILE, no session
   cache (every connection a full handshake). */
static int tls_setup(const char *cafile) {
    tls_ctx = SSL_CTX_new(TLS_client_method());
    if (!tls_ctx || !SSL_CTX_set_min_proto_version(tls_ctx, TLS1_2_VERSION)) return -1;
    if (SSL_CTX_load_verify_locations(tls_ctx, cafile, NULL) != 1) return -1;
    SSL_CTX_set_verify(tls_ctx, SSL_VERIFY_PEER, NULL);
    SSL_CTX_set_session_cache_mode(tls_ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_mode(tls_ctx, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    static const unsigned char alpn[] = {8, 'h', 't', 't', 'p', '/', '1', '.', '1'};
    SSL_CTX_set_alpn_protos(tls_ctx, alpn, sizeof alpn);
    return 0;
}

/* A session over the connected socket, expecting the -x host in the certificate. */
static int tls_begin(struct conn *c) {
    unsigned char ip[16];
    c->ssl = SSL_new(tls_ctx);
    if (!c->ssl || SSL_set_fd(c->ssl, c->fd) != 1) return -1;
    if (inet_pton(AF_INET, proxy_host, ip) == 1 || inet_pton(AF_INET6, proxy_host, ip) == 1)
        return X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(c->ssl), proxy_host) == 1 ? 0 : -1;
    if (SSL_set_tlsext_host_name(c->ssl, proxy_host) != 1) return -1; /* SNI: names only */
    return SSL_set1_host(c->ssl, proxy_host) == 1 ? 0 : -1;
}

/* Before each OpenSSL call: SSL_get_error reads the error queue and errno. */
static void tls_clear(void) {
    ERR_clear_error();
    errno = 0;
}

/* An OpenSSL result `r` in send()/recv() terms: r > 0 bytes; 0 at the end of the
   stream (close_notify, or a TCP EOF); -1 with errno EAGAIN when the session waits for
   the socket, EPROTO (reason in tls_why) when it failed, or the socket's own errno. */
static ssize_t tls_result(struct conn *c, int r) {
    if (r > 0) return r;
    int e = SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) { errno = EAGAIN; return -1; }
    if (e == SSL_ERROR_ZERO_RETURN) return 0;
    unsigned long code = ERR_peek_error();
    if (e == SSL_ERROR_SYSCALL && !code) return errno ? -1 : 0;
    if (ERR_GET_REASON(code) == SSL_R_UNEXPECTED_EOF_WHILE_READING) return 0;
    long v = SSL_get_verify_result(c->ssl);
    if (v != X509_V_OK)
        snprintf(tls_why, sizeof tls_why, "TLS: certificate verify failed: %s", X509_verify_cert_error_string(v));
    else {
        const char *why = code ? ERR_reason_error_string(code) : NULL;
        snprintf(tls_why, sizeof tls_why, "TLS: %s", why ? why : "failed");
    }
    ERR_clear_error();
    errno = EPROTO;
    return -1;
}

static ssize_t tls_handshake(struct conn *c) {
    tls_clear();
    int r = SSL_connect(c->ssl);
    if (r != 1) return tls_result(c, r);
    hs_count++;
    hs_ns += now_ns() - c->t0;
    snprintf(tls_version, sizeof tls_version, "%s", SSL_get_version(c->ssl));
    snprintf(tls_cipher, sizeof tls_cipher, "%s", SSL_get_cipher_name(c->ssl));
    return 1;
}
#endif

/* send()/recv() on a connection, through its TLS session when it has one. */
static ssize_t conn_send(struct conn *c, const void *buf, size_t len) {
#ifdef LOADGEN_TLS
    if (c->ssl) {
        tls_clear();
        return tls_result(c, SSL_write(c->ssl, buf, (int)len));
    }
#endif
    return send(c->fd, buf, len, MSG_NOSIGNAL | MSG_DONTWAIT);
}

static ssize_t conn_recv(struct conn *c, void *buf, size_t len) {
#ifdef LOADGEN_TLS
    if (c->ssl) {
        tls_clear();
        return tls_result(c, SSL_read(c->ssl, buf, (int)len));
    }
#endif
    return recv(c->fd, buf, len, MSG_DONTWAIT);
}

/* ---- connection state machine ---- */
static void enqueue(int i) {
    if (!conns[i].queued) { conns[i].queued = 1; readyq[nready++] = i; }
}

/* A clean end: close_notify first (one try, as a client closing its tunnel would). */
static void close_notify(struct conn *c) {
#ifdef LOADGEN_TLS
    if (c->ssl) {
        tls_clear();
        SSL_shutdown(c->ssl);
        ERR_clear_error();
    }
#endif
    (void)c;
}

static void close_fd(struct conn *c) {
#ifdef LOADGEN_TLS
    if (c->ssl) { SSL_free(c->ssl); c->ssl = NULL; }
#endif
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
    if (c->pending) { c->pending = 0; n_pending--; }
}

static void start_conn(int i);

static void fail(int i, int e, const char *msg) {
    struct conn *c = &conns[i];
    errors[e]++;
    if (msg) snprintf(last_error, sizeof last_error, "%s", msg);
    close_fd(c);
    if (mode == M_RATE || mode == M_TLS) {
        c->state = S_BACKOFF; /* restart a little later, no hot error loop */
        c->tdl = now_ns() + 5000000ull;
    } else {
        c->state = S_FREE;
        c->tdl = 0;
    }
}

static void start_conn(int i) {
    struct conn *c = &conns[i];
    c->gen++;
    c->off = c->hlen = 0;
    c->final_check = 0;
    c->t0 = now_ns();
    c->tdl = c->t0 + (uint64_t)(op_timeout * 1e9);
    attempts++;
    int fd = socket(dst_addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) { c->fd = -1; fail(i, E_CONNECT, strerror(errno)); return; }
    c->fd = fd;
    c->pending = 1;
    n_pending++;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    int r = connect(fd, (struct sockaddr *)&dst_addr, dst_len);
    if (r != 0 && errno != EINPROGRESS) {
        char m[160];
        snprintf(m, sizeof m, "connect: %s", strerror(errno));
        fail(i, E_CONNECT, m);
        return;
    }
    c->state = S_CONNECTING;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
                             .data.u64 = ((uint64_t)c->gen << 32) | (uint32_t)i};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) != 0) { fail(i, E_IO, "epoll_ctl"); return; }
}

static void after_tunnel(int i, size_t extra) {
    struct conn *c = &conns[i];
    c->off = 0;
    switch (mode) {
    case M_RATE: case M_TLS: case M_IDLE:
        if (extra) { fail(i, E_PROTO, "unexpected bytes after 200"); return; }
        c->state = S_SEND_PAY;
        break;
    case M_BULK: case M_BULKDOWN:
        if (c->pending) { c->pending = 0; n_pending--; }
        established++;
        c->tdl = 0;
        if (mode == M_BULKDOWN) bytes_total += extra;
        c->state = mode == M_BULK ? S_STREAM_UP : S_STREAM_DOWN;
        break;
    }
}

static void txn_done(int i) {
    struct conn *c = &conns[i];
    uint64_t t = now_ns();
    if (mode == M_IDLE) {
        if (!c->final_check) {
            if (c->pending) { c->pending = 0; n_pending--; }
            established++;
            record_latency(t - c->t0);
            c->state = S_IDLE;
            c->tdl = 0;
        } else {
            alive++;
            c->state = S_DONE;
            c->tdl = 0;
        }
        return;
    }
    /* rate / tls-rate */
    done_all++;
    if (t >= win_start && t < win_end) {
        ok_count++;
        record_latency(t - c->t0);
    }
    close_notify(c);
    close_fd(c);
    c->state = S_FREE;
    if (t < win_end) start_conn(i);
}

static int parse_status(const char *h, size_t n) {
    /* "HTTP/1.x NNN ..." */
    if (n < 12 || memcmp(h, "HTTP/1.", 7) != 0) return -1;
    if (h[9] < '0' || h[9] > '9' || h[10] < '0' || h[10] > '9' || h[11] < '0' || h[11] > '9') return -1;
    return (h[9] - '0') * 100 + (h[10] - '0') * 10 + (h[11] - '0');
}

/* One non-blocking send/recv result: 1 to go on with `n` bytes; 0 to stop, on EAGAIN
   or after recording a failure. `closed` names what an EOF means (NULL: not an error). */
static int io_ok(int i, ssize_t n, const char *closed, const char *failed) {
    if (n == 0 && closed) { fail(i, E_CLOSED, closed); return 0; }
    if (n < 0) {
        if (errno == EPROTO && tls_why[0]) fail(i, E_PROTO, tls_why);
        else if (errno != EAGAIN) fail(i, E_IO, failed);
        return 0;
    }
    return 1;
}

/* A bulk tunnel's turn: send (up) or drain (down) until EAGAIN or MAX_STEPS chunks;
   returns 1 when more work remains without a new edge (caller requeues).
   Through TLS the bytes must be decrypted (no MSG_TRUNC): they land in `scratch`. */
static int bulk_steps(int i, int up) {
    struct conn *c = &conns[i];
    for (int k = 0; k < MAX_STEPS; k++) {
        ssize_t n;
        if (up) n = conn_send(c, bulkbuf, BULK_CHUNK);
        else if (tls_ca) n = conn_recv(c, scratch, SCRATCH);
        else n = recv(c->fd, NULL, 1 << 20, MSG_TRUNC | MSG_DONTWAIT);
        if (!io_ok(i, n, up ? NULL : "bulk-down tunnel closed", up ? "bulk send failed" : "bulk-down recv failed"))
            return 0;
        bytes_total += (uint64_t)n;
    }
    return 1;
}

/* returns 1 when more work remains without a new edge (caller requeues) */
static int drive(int i, uint32_t events) {
    struct conn *c = &conns[i];
    for (int step = 0; step < MAX_STEPS; step++) {
        if (c->fd < 0) return 0;
        int fd = c->fd;
        ssize_t n;
        switch (c->state) {
        case S_CONNECTING: {
            if (!(events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) return 0;
            int err = 0;
            socklen_t el = sizeof err;
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el);
            if (err) {
                char m[160];
                snprintf(m, sizeof m, "connect: %s", strerror(err));
                fail(i, E_CONNECT, m);
                return 0;
            }
            if (direct) { after_tunnel(i, 0); }
            else if (tls_ca) {
#ifdef LOADGEN_TLS
                if (tls_begin(c) != 0) { fail(i, E_IO, "TLS session set-up failed"); return 0; }
#endif
                c->state = S_HANDSHAKE;
            } else { c->state = S_SEND_REQ; c->off = 0; }
            break;
        }
#ifdef LOADGEN_TLS
        case S_HANDSHAKE:
            if (!io_ok(i, tls_handshake(c), "proxy closed during the TLS handshake", "TLS handshake failed"))
                return 0;
            c->state = S_SEND_REQ;
            c->off = 0;
            break;
#endif
        case S_SEND_REQ: {
            const char *head = req;
            size_t head_len = reqlen;
            if (new_heads) {
                if (c->off == 0) {
                    if (!c->req) c->req = malloc(1024);
                    c->reqlen = (uint32_t)snprintf(c->req, 1024,
                        "CONNECT %s HTTP/1.1\r\nHost: %s\r\n%sX-Seq: %lu\r\nUser-Agent: bench-loadgen/1\r\n\r\n",
                        target_str, target_str, auth_line, head_seq++);
                }
                head = c->req;
                head_len = c->reqlen;
            }
            n = conn_send(c, head + c->off, head_len - c->off);
            if (!io_ok(i, n, NULL, "send CONNECT failed")) return 0;
            c->off += (uint32_t)n;
            if (c->off == head_len) { c->state = S_READ_RESP; c->hlen = 0; }
            break;
        }
        case S_READ_RESP: {
            n = conn_recv(c, c->hbuf + c->hlen, HBUF - 1 - c->hlen);
            if (!io_ok(i, n, "proxy closed before CONNECT response", "recv CONNECT response failed")) return 0;
            c->hlen += (uint32_t)n;
            c->hbuf[c->hlen] = 0;
            char *e = memmem(c->hbuf, c->hlen, "\r\n\r\n", 4);
            if (!e) {
                if (c->hlen >= HBUF - 1) { fail(i, E_PROTO, "CONNECT response headers too long"); return 0; }
                break;
            }
            int st = parse_status(c->hbuf, c->hlen);
            if (st != 200) {
                char m[200];
                char *eol = memchr(c->hbuf, '\r', c->hlen);
                int ll = eol ? (int)(eol - c->hbuf) : 60;
                if (ll > 120) ll = 120;
                snprintf(m, sizeof m, "proxy answered: %.*s", ll, c->hbuf);
                fail(i, st < 0 ? E_PROTO : E_STATUS, m);
                return 0;
            }
            size_t used = (size_t)(e + 4 - c->hbuf);
            after_tunnel(i, c->hlen - used);
            break;
        }
        case S_SEND_PAY:
            n = conn_send(c, payload + c->off, (size_t)plen - c->off);
            if (!io_ok(i, n, NULL, "send payload failed")) return 0;
            c->off += (uint32_t)n;
            if (c->off == (uint32_t)plen) { c->state = S_READ_ECHO; c->off = 0; }
            break;
        case S_READ_ECHO:
            n = conn_recv(c, c->rbuf + c->off, (size_t)plen - c->off);
            if (!io_ok(i, n, "tunnel closed before full echo", "recv echo failed")) return 0;
            c->off += (uint32_t)n;
            if (c->off == (uint32_t)plen) {
                if (memcmp(c->rbuf, payload, (size_t)plen) != 0) {
                    fail(i, E_MISMATCH, "echo mismatch");
                    return 0;
                }
                txn_done(i);
                return 0;
            }
            break;
        case S_IDLE: case S_DONE: {
            if (!(events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))) return 0;
            char b;
            /* through TLS a record may carry no data (a ticket, a KeyUpdate): read, not peek */
            n = tls_ca ? conn_recv(c, &b, 1) : recv(fd, &b, 1, MSG_DONTWAIT | MSG_PEEK);
            if (!io_ok(i, n, "idle tunnel closed by proxy", "idle tunnel error")) return 0;
            fail(i, E_PROTO, "unexpected data on idle tunnel");
            return 0;
        }
        case S_STREAM_UP:
        case S_STREAM_DOWN:
            return bulk_steps(i, c->state == S_STREAM_UP);
        default:
            return 0;
        }
    }
    return 1;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static double pct(double p) {
    if (!nsamples) return 0;
    size_t k = (size_t)ceil(p / 100.0 * (double)nsamples);
    if (k < 1) k = 1;
    if (k > nsamples) k = nsamples;
    return (double)samples[k - 1] / 1000.0;
}

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen -m rate|tls-rate|bulk|bulk-down|idle (-x PROXY | -D) -t TARGET\n"
            "       [-u USER[:PASS]] [-c CONC] [-d SECONDS] [-r RAMP_S] [-n BYTES]\n"
            "       [-s SNI] [-T OP_TIMEOUT_S] [-i MAX_INFLIGHT] [-H HELLO_FILE] [-A AUTHORITY]\n"
            "       [-S CAFILE] [-q]\n"
            "       loadgen -V   (features)\n");
    exit(2);
}

static void serve_queued(int i) {
    conns[i].queued = 0;
    if (conns[i].fd >= 0 && drive(i, EPOLLIN | EPOLLOUT)) enqueue(i);
}

int main(int argc, char **argv) {
    const char *proxy = NULL, *target = NULL, *hello_out = NULL;
    int opt;
    while ((opt = getopt(argc, argv, "m:x:Dt:u:c:d:r:n:s:T:i:H:A:S:NVqh")) != -1) {
        switch (opt) {
        case 'm':
            for (int k = 0; k < 5; k++) if (!strcmp(optarg, mode_names[k])) mode = k;
            if (mode < 0) { fprintf(stderr, "loadgen: unknown mode %s\n", optarg); usage(); }
            break;
        case 'x': proxy = optarg; break;
        case 'D': direct = 1; break;
        case 't': target = optarg; break;
        case 'u': user = optarg; break;
        case 'c': conc = atoi(optarg); break;
        case 'd': duration = atof(optarg); break;
        case 'r': ramp = atof(optarg); break;
        case 'n': plen = atoi(optarg); break;
        case 's': sni = optarg; break;
        case 'T': op_timeout = atof(optarg); break;
        case 'i': max_inflight = atoi(optarg); break;
        case 'H': hello_out = optarg; break;
        case 'A': authority = optarg; break;
        case 'S': tls_ca = optarg; break;
        case 'N': new_heads = 1; break;
        case 'V':
#ifdef LOADGEN_TLS
            printf("{\"tls\":true,\"openssl\":\"%s\"}\n", OpenSSL_version(OPENSSL_VERSION));
#else
            printf("{\"tls\":false,\"openssl\":null}\n");
#endif
            return 0;
        case 'q': quiet = 1; break;
        default: usage();
        }
    }
    uint8_t hello[1024];
    size_t hello_len = build_client_hello(hello, sni);
    if (hello_out) {
        FILE *f = fopen(hello_out, "wb");
        if (!f || fwrite(hello, 1, hello_len, f) != hello_len) { perror("hello file"); return 1; }
        fclose(f);
        if (mode < 0) return 0;
    }
    if (mode < 0 || !target || (!proxy && !direct)) usage();
    if (conc < 1 || conc > 200000) { fprintf(stderr, "loadgen: bad -c\n"); return 2; }
    if (!(duration > 0 && duration <= 600)) { fprintf(stderr, "loadgen: -d must be in (0, 600]\n"); return 2; }
    if (!(ramp >= 0 && ramp <= 60)) { fprintf(stderr, "loadgen: -r must be in [0, 60]\n"); return 2; }
    if (!(op_timeout > 0 && op_timeout <= 120)) { fprintf(stderr, "loadgen: bad -T\n"); return 2; }
    if (plen < 1 || plen > 1 << 20) { fprintf(stderr, "loadgen: bad -n\n"); return 2; }
    if (max_inflight < 1) max_inflight = 1;
    if (mode == M_IDLE) plen = 16;
    if (mode == M_TLS) plen = (int)hello_len;

    /* addresses: both must be loopback */
    struct sockaddr_storage tss;
    socklen_t tsl;
    char host[256];
    int port, r;
    if ((r = parse_hostport(target, &tss, &tsl, host, sizeof host, &port)) != 0) {
        fprintf(stderr, "loadgen: target '%s' invalid or not loopback (%d)\n", target, r);
        return 2;
    }
    snprintf(target_str, sizeof target_str, "%s", target);
    if (authority) {
        if (direct) { fprintf(stderr, "loadgen: -A needs a proxy (-x)\n"); return 2; }
        size_t al = strlen(authority);
        if (al == 0 || al >= sizeof target_str || strpbrk(authority, " \t\r\n\"\\") || !strchr(authority, ':')) {
            fprintf(stderr, "loadgen: bad -A authority (want HOST:PORT)\n");
            return 2;
        }
        snprintf(target_str, sizeof target_str, "%s", authority);
    }
    if (direct) {
        dst_addr = tss;
        dst_len = tsl;
    } else if ((r = parse_hostport(proxy, &dst_addr, &dst_len, host, sizeof host, &port)) != 0) {
        fprintf(stderr, "loadgen: proxy '%s' invalid or not loopback (%d)\n", proxy, r);
        return 2;
    }
    if (tls_ca) {
#ifdef LOADGEN_TLS
        if (direct) { fprintf(stderr, "loadgen: -S needs a proxy (-x)\n"); return 2; }
        snprintf(proxy_host, sizeof proxy_host, "%s", host); /* what the certificate must name */
        if (tls_setup(tls_ca) != 0) {
            const char *why = ERR_reason_error_string(ERR_peek_last_error());
            fprintf(stderr, "loadgen: -S %s: cannot load the CA file: %s\n", tls_ca, why ? why : "?");
            return 2;
        }
#else
        fprintf(stderr, "loadgen: -S: built without TLS (OpenSSL headers missing at build time)\n");
        return 2;
#endif
    }

    /* CONNECT request, built once */
    req = malloc(2048);
    if (user) {
        char cred[300], enc[420];
        if (strchr(user, ':')) snprintf(cred, sizeof cred, "%s", user);
        else snprintf(cred, sizeof cred, "%s:x", user);
        b64(cred, enc);
        snprintf(auth_line, sizeof auth_line, "Proxy-Authorization: Basic %s\r\n", enc);
    }
    reqlen = (size_t)snprintf(req, 2048, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n%sUser-Agent: bench-loadgen/1\r\n\r\n",
                              target_str, target_str, auth_line);

    payload = malloc((size_t)plen);
    if (mode == M_TLS) memcpy(payload, hello, hello_len);
    else for (int k = 0; k < plen; k++) payload[k] = (uint8_t)('A' + (k * 7) % 26);
    bulkbuf = malloc(BULK_CHUNK);
    scratch = malloc(SCRATCH);
    for (int k = 0; k < BULK_CHUNK; k++) bulkbuf[k] = (uint8_t)k;

    raise_nofile();
    signal(SIGPIPE, SIG_IGN);
    conns = calloc((size_t)conc, sizeof *conns);
    readyq = malloc(sizeof(int) * (size_t)conc);
    if (!conns || !readyq) { fprintf(stderr, "loadgen: out of memory\n"); return 1; }
    for (int k = 0; k < conc; k++) {
        conns[k].fd = -1;
        conns[k].rbuf = malloc((size_t)plen);
        if (!conns[k].rbuf) { fprintf(stderr, "loadgen: out of memory\n"); return 1; }
    }
    ep = epoll_create1(EPOLL_CLOEXEC);

    uint64_t t_start = now_ns();
    uint64_t dur_ns = (uint64_t)(duration * 1e9), ramp_ns = (uint64_t)(ramp * 1e9);
    uint64_t op_ns = (uint64_t)(op_timeout * 1e9);
    uint64_t hard_end;
    uint64_t t_ready = 0, hold_end = 0, check_end = 0;
    if (mode == M_IDLE) {
        idle_phase = 1;
        win_start = t_start;
        win_end = t_start + 2 * op_ns + (uint64_t)conc * 2000000ull; /* establish deadline */
        hard_end = win_end + dur_ns + op_ns + 2000000000ull;
    } else {
        win_start = t_start + ramp_ns;
        win_end = win_start + dur_ns;
        hard_end = win_end + 1000000000ull;
    }
    int next_start = 0;
    if (mode == M_RATE || mode == M_TLS) {
        for (int k = 0; k < conc; k++) start_conn(k);
        next_start = conc;
    }

    struct epoll_event evs[1024];
    int *tmpq = malloc(sizeof(int) * (size_t)conc);
    uint64_t last_scan = t_start;
    /* main loop: bounded by hard_end (time) and an iteration cap (count) */
    for (uint64_t iter = 0; iter < 2000000000ull; iter++) {
        uint64_t t = now_ns();
        if (t >= hard_end) { snprintf(last_error, sizeof last_error, "hard deadline reached"); break; }
        if (mode != M_IDLE) {
            if (!bytes_snap_done && t >= win_start) { bytes_at_win = bytes_total; bytes_snap_done = 1; }
            if (t >= win_end) break;
        }
        /* staged starts for bulk/idle: cap simultaneous handshakes */
        if (mode != M_RATE && mode != M_TLS && (mode != M_IDLE || idle_phase == 1)) {
            for (int g = 0; g < conc && next_start < conc && n_pending < max_inflight; g++)
                start_conn(next_start++);
        }
        if (mode == M_IDLE) {
            if (idle_phase == 1 && next_start >= conc && n_pending == 0) {
                t_ready = t;
                hold_end = t + dur_ns;
                idle_phase = 2;
                printf("READY %llu\n", (unsigned long long)established);
                fflush(stdout);
            } else if (idle_phase == 1 && t >= win_end) {
                /* establishment deadline: fail the stragglers */
                for (int k = 0; k < conc; k++)
                    if (conns[k].pending && conns[k].fd >= 0) fail(k, E_TIMEOUT, "tunnel establishment timed out");
                next_start = conc;
                continue;
            } else if (idle_phase == 2 && t >= hold_end) {
                idle_phase = 3;
                check_end = t + op_ns;
                for (int k = 0; k < conc; k++) {
                    struct conn *c = &conns[k];
                    if (c->state != S_IDLE || c->fd < 0) continue;
                    c->final_check = 1;
                    c->state = S_SEND_PAY;
                    c->off = 0;
                    c->tdl = check_end;
                    if (drive(k, EPOLLOUT)) enqueue(k);
                }
            } else if (idle_phase == 3) {
                int left = 0;
                for (int k = 0; k < conc; k++)
                    if (conns[k].fd >= 0 && conns[k].final_check && conns[k].state != S_DONE) left++;
                if (!left || t >= check_end) break;
            }
        }
        /* timeouts and backoff restarts, every 10 ms */
        if (t - last_scan >= 10000000ull) {
            last_scan = t;
            for (int k = 0; k < conc; k++) {
                struct conn *c = &conns[k];
                if (!c->tdl || t < c->tdl) continue;
                if (c->state == S_BACKOFF) {
                    c->tdl = 0;
                    c->state = S_FREE;
                    if (t < win_end) start_conn(k);
                } else if (c->fd >= 0) {
                    fail(k, E_TIMEOUT, "operation timed out");
                }
            }
        }
        int timeout = nready ? 0 : 5;
        int n = epoll_wait(ep, evs, 1024, timeout);
        for (int k = 0; k < n; k++) {
            uint32_t idx = (uint32_t)evs[k].data.u64;
            uint32_t gen = (uint32_t)(evs[k].data.u64 >> 32);
            if (idx >= (uint32_t)conc) continue;
            struct conn *c = &conns[idx];
            if (c->gen != gen || c->fd < 0) continue; /* stale event */
            if (c->queued) continue;
            if (drive((int)idx, evs[k].events)) enqueue((int)idx);
        }
        serve_ready(&readyq, &tmpq, &nready, serve_queued);
    }
    uint64_t t_end = now_ns();
    uint64_t open_at_end = 0;
    for (int k = 0; k < conc; k++) if (conns[k].fd >= 0) { open_at_end++; close(conns[k].fd); }

    double window;
    uint64_t bytes = 0;
    if (mode == M_IDLE) {
        window = t_ready ? (double)(hold_end - t_ready) / 1e9 : 0;
        ok_count = established;
    } else {
        uint64_t we = t_end < win_end ? t_end : win_end;
        window = we > win_start ? (double)(we - win_start) / 1e9 : 0;
        bytes = bytes_snap_done ? bytes_total - bytes_at_win : 0;
    }
    qsort(samples, nsamples, sizeof *samples, cmp_u64);
    double mean = 0;
    for (size_t k = 0; k < nsamples; k++) mean += (double)samples[k];
    if (nsamples) mean = mean / (double)nsamples / 1000.0;
    uint64_t nerr = 0;
    for (int k = 0; k < E_NERR; k++) nerr += errors[k];

    printf("{\"mode\":\"%s\",\"direct\":%s,\"target\":\"%s\",\"conc\":%d,\"payload\":%d,"
           "\"window_s\":%.3f,\"ok\":%llu,\"attempts\":%llu,\"errors\":%llu,\"err\":{",
           mode_names[mode], direct ? "true" : "false", target_str, conc, plen, window,
           (unsigned long long)ok_count, (unsigned long long)attempts, (unsigned long long)nerr);
    for (int k = 0; k < E_NERR; k++)
        printf("%s\"%s\":%llu", k ? "," : "", err_names[k], (unsigned long long)errors[k]);
    printf("},\"rate\":%.1f,\"p50_us\":%.1f,\"p90_us\":%.1f,\"p99_us\":%.1f,\"max_us\":%.1f,\"mean_us\":%.1f,"
           "\"samples\":%zu,\"bytes\":%llu,\"mbps\":%.1f,\"established\":%llu,\"alive\":%llu,"
           "\"open_at_end\":%llu,\"done_all\":%llu,\"bytes_all\":%llu,\"tls_handshakes\":%llu,"
           "\"tls_hs_mean_us\":%.1f,\"tls_version\":\"%s\",\"tls_cipher\":\"%s\",\"last_error\":\"",
           window > 0 ? (double)ok_count / window : 0.0, pct(50), pct(90), pct(99),
           nsamples ? (double)samples[nsamples - 1] / 1000.0 : 0.0, mean, nsamples,
           (unsigned long long)bytes, window > 0 ? (double)bytes / window / 1e6 : 0.0,
           (unsigned long long)established, (unsigned long long)alive,
           (unsigned long long)open_at_end, (unsigned long long)done_all,
           (unsigned long long)bytes_total, (unsigned long long)hs_count,
           hs_count ? (double)hs_ns / (double)hs_count / 1000.0 : 0.0, TLS_VERSION_NAME, TLS_CIPHER_NAME);
    for (const char *q = last_error; *q; q++) {
        if (*q == '"' || *q == '\\') putchar('\\');
        if ((unsigned char)*q >= 0x20) putchar(*q);
    }
    printf("\"}\n");
    if (!quiet) {
        fprintf(stderr, "loadgen %s%s: ok=%llu errors=%llu rate=%.0f/s p50=%.0fus p99=%.0fus MB/s=%.1f\n",
                mode_names[mode], direct ? " (direct)" : "", (unsigned long long)ok_count,
                (unsigned long long)nerr, window > 0 ? (double)ok_count / window : 0.0, pct(50), pct(99),
                window > 0 ? (double)bytes / window / 1e6 : 0.0);
        if (last_error[0]) fprintf(stderr, "loadgen: last error: %s\n", last_error);
    }
    return 0;
}
