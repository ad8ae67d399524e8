/* RESP2 framing and connection state: turns each connection's byte stream
 * into commands, and replies into bytes.
 *
 * Bytes are parsed where they lie: a frame that holds whole commands is
 * executed straight from the RX ring, and only the unfinished tail of a
 * command is copied into a per-connection buffer on the heap. The parser is
 * resumable (it remembers how far it validated the unfinished command), so a
 * value arriving in many frames is scanned once, and a known bulk length
 * reserves its whole buffer up front instead of doubling towards it.
 *
 * Malformed input gets `-ERR Protocol error: ...` and the connection is
 * closed; nothing a client sends can do more than that. */
#include "alloc.h"
#include "kv_internal.h"
#include "store.h"

#define MAX_INLINE 65536ULL              /* inline request line, as Redis */
#define MAX_BULK (512ULL << 20)          /* proto-max-bulk-len of Redis */
#define MAX_MULTIBULK (1024LL * 1024)    /* arguments per command, as Redis */
#define MIN_BUFFER 512ULL
#define KEEP_BUFFER 16384ULL             /* an emptied buffer above this is freed */
#define STATIC_ARGS 256
#define CONN_SLOTS (KV_MAX_CONNS * 2)    /* open addressing, load <= 1/2 */
#define CONN_HASH_SHIFT (32 - 13)        /* log2(CONN_SLOTS) == 13 */

_Static_assert(CONN_SLOTS == 1 << 13, "CONN_HASH_SHIFT follows CONN_SLOTS");

enum { KIND_NONE, KIND_MULTIBULK, KIND_INLINE };
enum { PARSE_DONE, PARSE_MORE, PARSE_ERROR };

/* How far the command at the start of the connection's input was validated. */
struct parse_state {
    u8 kind;
    i32 argc; /* multibulk: -1 until the "*<n>" line is read; inline: words */
    i32 done; /* multibulk arguments validated */
    i32 bulk; /* length of the bulk being read, -1 before its "$<n>" line */
    u32 pos;  /* bytes validated (DONE: bytes the command occupies) */
    u32 need; /* the command is incomplete until this many bytes are there */
    u8 resumed; /* validated over several calls: argument pointers are stale */
    u8 quoted;  /* inline: the line has quotes, arguments need unquoting */
};

/* Input is capped well below 4 GiB, so 32-bit positions suffice. */
_Static_assert(MAX_MULTIBULK < 0x7FFFFFFF && MAX_BULK < 0x7FFFFFFF, "parse_state fields are 32-bit");

struct conn {
    u32 id; /* 0 = free slot */
    u8 resp3;
    u32 len, cap;
    u8 *buf;
    struct parse_state ps;
};

static struct conn conns[CONN_SLOTS];
static u64 nconns;
static u64 input_limit;
static u64 boot_ns;
static u64 ncommands;

static u32 cur;        /* connection whose command runs */
static struct conn *cur_conn;
static int cur_close;  /* QUIT asked to close it after the reply */
static const char *parse_error;
static struct arg static_args[STATIC_ARGS];

/* --- the virtual clock, read at most once per batch ------------------- */

static u64 batch_ns;
static int batch_ns_valid;

void kv_batch_begin(void) { batch_ns_valid = 0; }

static u64 now_ns(void) {
    if (!batch_ns_valid) {
        batch_ns = plat_now_ns();
        batch_ns_valid = 1;
    }
    return batch_ns;
}

i64 kv_now_ms(void) { return (i64)(now_ns() / 1000000ULL); }
u64 boot_time_ns(void) { return boot_ns; }
u64 commands_processed(void) { return ncommands; }
u64 open_connections(void) { return nconns; }
u32 current_conn(void) { return cur; }
void request_close(void) { cur_close = 1; }

/* --- replies ------------------------------------------------------------ */

void reply_raw(const void *p, u64 n) { out_data(cur, p, n); }

void reply_error(const char *msg) {
    u8 buf[256];
    usize n = 0;
    buf[n++] = '-';
    while (*msg && n < sizeof(buf) - 2)
        buf[n++] = (u8)*msg++;
    buf[n++] = '\r';
    buf[n++] = '\n';
    reply_raw(buf, n);
}

static void reply_prefixed(u8 type, i64 v) {
    u8 buf[32];
    buf[0] = type;
    usize n = 1 + fmt_i64(v, buf + 1);
    buf[n++] = '\r';
    buf[n++] = '\n';
    reply_raw(buf, n);
}

void reply_int(i64 v) { reply_prefixed(':', v); }
void reply_array(u64 n) { reply_prefixed('*', (i64)n); }
void reply_map(u64 n) {
    if (cur_conn->resp3)
        reply_prefixed('%', (i64)n);
    else
        reply_array(2 * n);
}

void reply_nil(void) {
    if (cur_conn->resp3)
        reply_lit("_\r\n");
    else
        reply_lit("$-1\r\n");
}

int current_protocol(void) { return cur_conn->resp3 ? 3 : 2; }
void set_protocol(int version) { cur_conn->resp3 = version == 3; }

void reply_bulk(const u8 *p, u64 n) {
    u8 buf[288];
    buf[0] = '$';
    usize h = 1 + fmt_u64(n, buf + 1);
    buf[h++] = '\r';
    buf[h++] = '\n';
    if (n <= sizeof(buf) - h - 2) { /* one piece of output for small values */
        mem_copy(buf + h, p, n);
        buf[h + n] = '\r';
        buf[h + n + 1] = '\n';
        reply_raw(buf, h + n + 2);
        return;
    }
    reply_raw(buf, h);
    reply_raw(p, n);
    reply_lit("\r\n");
}

/* --- the connection table ----------------------------------------------- */

static inline u64 conn_home(u32 id) { return (u64)((id * 0x9E3779B1u) >> CONN_HASH_SHIFT); }

static struct conn *conn_find(u32 id) {
    for (u64 i = conn_home(id);; i = (i + 1) & (CONN_SLOTS - 1)) {
        if (conns[i].id == id)
            return &conns[i];
        if (conns[i].id == 0)
            return NULL_PTR;
    }
}

static struct conn *conn_insert(u32 id) {
    u64 i = conn_home(id);
    while (conns[i].id != 0)
        i = (i + 1) & (CONN_SLOTS - 1);
    mem_set(&conns[i], 0, sizeof(conns[i]));
    conns[i].id = id;
    nconns++;
    return &conns[i];
}

/* Frees a slot and shifts later members of its probe run back into the
 * hole, so lookups never need tombstones. */
static void conn_remove(struct conn *c) {
    heap_free(c->buf);
    u64 hole = (u64)(c - conns);
    conns[hole].id = 0;
    conns[hole].buf = NULL_PTR;
    nconns--;
    for (u64 i = (hole + 1) & (CONN_SLOTS - 1); conns[i].id != 0; i = (i + 1) & (CONN_SLOTS - 1)) {
        u64 home = conn_home(conns[i].id);
        /* Movable into the hole unless its home lies cyclically in (hole, i]. */
        int stays = (hole <= i) ? (hole < home && home <= i) : (hole < home || home <= i);
        if (!stays) {
            conns[hole] = conns[i];
            conns[i].id = 0;
            conns[i].buf = NULL_PTR;
            hole = i;
        }
    }
}

static void close_current(struct conn *c) {
    out_close(c->id);
    conn_remove(c);
}

static void protocol_error(struct conn *c, const char *what) {
    u8 buf[160];
    static const char prefix[] = "-ERR Protocol error: ";
    usize n = sizeof(prefix) - 1;
    mem_copy(buf, prefix, n);
    while (*what && n < sizeof(buf) - 2)
        buf[n++] = (u8)*what++;
    buf[n++] = '\r';
    buf[n++] = '\n';
    out_data(c->id, buf, n);
    close_current(c);
}

/* --- parsing ------------------------------------------------------------- */

static inline void parse_reset(struct parse_state *ps) {
    mem_set(ps, 0, sizeof(*ps));
    ps->argc = -1;
    ps->bulk = -1;
}

/* Reads the length in a "*<n>\r\n" or "$<n>\r\n" line at b[at]. Returns 1
 * with the value and the index after the LF, 0 if the line is incomplete, -1
 * if it is malformed. One pass over the bytes: this runs for every argument
 * of every request, and under emulation every instruction counts. */
#define MAX_LENGTH_DIGITS 12 /* no valid length has more */
static int length_line(const u8 *b, u64 at, u64 n, i64 *value, u64 *end) {
    /* Most lengths have one or two digits and the whole line is there. */
    if (likely(at + 5 <= n)) {
        u32 d0 = (u32)b[at + 1] - '0', d1 = (u32)b[at + 2] - '0';
        if (d0 <= 9 && b[at + 2] == '\r' && b[at + 3] == '\n') {
            *value = d0;
            *end = at + 4;
            return 1;
        }
        if (d0 - 1 <= 8 && d1 <= 9 && b[at + 3] == '\r' && b[at + 4] == '\n') {
            *value = d0 * 10 + d1;
            *end = at + 5;
            return 1;
        }
    }
    u64 i = at + 1;
    int neg = 0;
    if (i < n && b[i] == '-') {
        neg = 1;
        i++;
    }
    u64 first = i;
    i64 v = 0;
    for (;; i++) {
        if (i >= n)
            return 0;
        u32 d = (u32)b[i] - '0';
        if (d > 9)
            break;
        if (i - first >= MAX_LENGTH_DIGITS)
            return -1;
        v = v * 10 + d;
    }
    if (i == first || b[i] != '\r' || (b[first] == '0' && i - first > 1))
        return -1;
    if (i + 1 >= n)
        return 0;
    if (b[i + 1] != '\n')
        return -1;
    *value = neg ? -v : v;
    *end = i + 2;
    return 1;
}

static int parse_multibulk(struct parse_state *ps, const u8 *b, u64 n) {
    if (ps->argc < 0) {
        i64 v;
        u64 end;
        int r = length_line(b, 0, n, &v, &end);
        if (r == 0)
            return PARSE_MORE;
        if (r < 0 || v > MAX_MULTIBULK) {
            parse_error = "invalid multibulk length";
            return PARSE_ERROR;
        }
        ps->argc = v > 0 ? v : 0; /* "*0" and "*-1" are empty requests */
        ps->pos = end;
    }
    while (ps->done < ps->argc) {
        if (ps->bulk < 0) {
            if (ps->pos >= n)
                return PARSE_MORE;
            if (b[ps->pos] != '$') {
                parse_error = "expected '$' before a bulk string";
                return PARSE_ERROR;
            }
            i64 v;
            u64 end;
            int r = length_line(b, ps->pos, n, &v, &end);
            if (r == 0)
                return PARSE_MORE;
            if (r < 0 || v < 0 || (u64)v > MAX_BULK) {
                parse_error = "invalid bulk length";
                return PARSE_ERROR;
            }
            if (end + (u64)v + 2 > input_limit) {
                parse_error = "request exceeds the input buffer limit";
                return PARSE_ERROR;
            }
            ps->bulk = v;
            ps->pos = end;
        }
        u64 body_end = ps->pos + (u64)ps->bulk + 2;
        if (n < body_end) {
            ps->need = body_end;
            return PARSE_MORE;
        }
        if (b[body_end - 2] != '\r' || b[body_end - 1] != '\n') {
            parse_error = "bulk string not followed by CRLF";
            return PARSE_ERROR;
        }
        /* Note where the argument lies while we are here; a command parsed
         * in one go then needs no second pass to find its arguments. */
        if (ps->done < STATIC_ARGS) {
            static_args[ps->done].p = b + ps->pos;
            static_args[ps->done].n = (u64)ps->bulk;
        }
        ps->pos = body_end;
        ps->bulk = -1;
        ps->need = 0;
        ps->done++;
    }
    return PARSE_DONE;
}

static inline int is_space(u8 c) { return c == ' ' || c == '\t'; }

static inline int hex_value(u8 c) {
    if (c >= '0' && c <= '9')
        return c - '0';
    c = ascii_upper(c);
    return (c >= 'A' && c <= 'F') ? c - 'A' + 10 : -1;
}

/* Splits an inline request line the way redis-cli and Redis do (Redis's
 * sdssplitargs): words between spaces; "double quotes" with \n \r \t \b \a
 * \xHH escapes, 'single quotes' with \'; a closing quote must end its word.
 * Unquoted bytes go to `out` (the line's length is enough); with `argv` ==
 * NULL it only counts (and `out` may be NULL). Returns the number of words,
 * or -1 for unbalanced quotes. Lines without quotes take a cheaper path. */
static i64 split_inline(const u8 *p, u64 n, u8 *out, struct arg *argv) {
    i64 words = 0;
    u64 i = 0, o = 0;
    for (;;) {
        while (i < n && is_space(p[i]))
            i++;
        if (i == n)
            return words;
        u64 start = out ? o : i;
        int dq = 0, sq = 0;
        for (; i < n; i++) {
            u8 c = p[i];
            if (dq) {
                if (c == '\\' && i + 3 < n && p[i + 1] == 'x' && hex_value(p[i + 2]) >= 0 &&
                    hex_value(p[i + 3]) >= 0) {
                    c = (u8)(hex_value(p[i + 2]) * 16 + hex_value(p[i + 3]));
                    i += 3;
                } else if (c == '\\' && i + 1 < n) {
                    c = p[++i];
                    c = c == 'n' ? '\n' : c == 'r' ? '\r' : c == 't' ? '\t' : c == 'b' ? '\b' : c == 'a' ? '\a' : c;
                } else if (c == '"') {
                    if (i + 1 < n && !is_space(p[i + 1]))
                        return -1;
                    dq = 0;
                    i++;
                    break;
                }
            } else if (sq) {
                if (c == '\\' && i + 1 < n && p[i + 1] == '\'') {
                    c = '\'';
                    i++;
                } else if (c == '\'') {
                    if (i + 1 < n && !is_space(p[i + 1]))
                        return -1;
                    sq = 0;
                    i++;
                    break;
                }
            } else if (is_space(c)) {
                break;
            } else if (c == '"' || c == '\'') {
                dq = c == '"';
                sq = c == '\'';
                continue;
            }
            if (out)
                out[o++] = c;
        }
        if (dq || sq)
            return -1;
        if (argv) {
            argv[words].p = out ? out + start : p + start;
            argv[words].n = out ? o - start : i - start;
        }
        words++;
    }
}

static int parse_inline(struct parse_state *ps, const u8 *b, u64 n) {
    u8 quoted = ps->quoted;
    for (u64 i = ps->pos; i < n; i++) {
        u8 c = b[i];
        if (c == '\n') {
            u64 len = (i > 0 && b[i - 1] == '\r') ? i - 1 : i;
            i64 words = 0;
            if (quoted) {
                words = split_inline(b, len, NULL_PTR, NULL_PTR);
                if (words < 0) {
                    parse_error = "unbalanced quotes in request";
                    return PARSE_ERROR;
                }
            } else {
                for (u64 j = 0; j < len; j++)
                    words += !is_space(b[j]) && (j == 0 || is_space(b[j - 1]));
            }
            ps->argc = (i32)words;
            ps->quoted = quoted;
            ps->pos = (u32)(i + 1);
            return PARSE_DONE;
        }
        quoted |= c == '"' || c == '\'';
        /* Control bytes never belong in a typed command: this is binary
         * garbage or a client speaking some other protocol. A CR is fine as
         * the first half of a line end (its LF may still be on its way). */
        if (c < 0x20 && c != '\t' && (c != '\r' || (i + 1 < n && b[i + 1] != '\n'))) {
            parse_error = "invalid byte in inline request";
            return PARSE_ERROR;
        }
    }
    ps->pos = (u32)n;
    ps->quoted = quoted;
    if (n > MAX_INLINE) {
        parse_error = "too big inline request";
        return PARSE_ERROR;
    }
    return PARSE_MORE;
}

static int parse_any(struct parse_state *ps, const u8 *b, u64 n);

static int parse(struct parse_state *ps, const u8 *b, u64 n) {
    int r = parse_any(ps, b, n);
    if (r == PARSE_MORE)
        ps->resumed = 1;
    return r;
}

static int parse_any(struct parse_state *ps, const u8 *b, u64 n) {
    if (ps->kind == KIND_NONE) {
        u8 c = b[0];
        if (c == '*') {
            ps->kind = KIND_MULTIBULK;
        } else if (c == '$' || c == '+' || c == '-' || c == ':' || c >= 0x7F ||
                   (c < 0x20 && c != '\r' && c != '\n' && c != '\t')) {
            /* A RESP reply type or a binary byte where a request must start. */
            parse_error = "expected '*' or an inline command";
            return PARSE_ERROR;
        } else {
            ps->kind = KIND_INLINE;
        }
    }
    return ps->kind == KIND_MULTIBULK ? parse_multibulk(ps, b, n) : parse_inline(ps, b, n);
}

/* Fills argv for a command `parse` accepted (headers already validated);
 * a quoted inline line is unquoted into `out` (as long as the line). */
static void collect_args(const struct parse_state *ps, const u8 *b, struct arg *argv, u8 *out) {
    if (ps->kind == KIND_MULTIBULK) {
        u64 p = 0;
        while (b[p] != '\n')
            p++;
        p++;
        for (i64 i = 0; i < ps->argc; i++) {
            u64 len = 0;
            p++; /* '$' */
            while (b[p] != '\r')
                len = len * 10 + (u64)(b[p++] - '0');
            p += 2;
            argv[i].p = b + p;
            argv[i].n = len;
            p += len + 2;
        }
        return;
    }
    u64 end = ps->pos - 1; /* the '\n' */
    if (end > 0 && b[end - 1] == '\r')
        end--;
    if (ps->quoted) {
        split_inline(b, end, out, argv);
        return;
    }
    i64 k = 0; /* plain words, pointing into the line */
    for (u64 j = 0; j < end;) {
        while (j < end && is_space(b[j]))
            j++;
        if (j == end)
            break;
        u64 start = j;
        while (j < end && !is_space(b[j]))
            j++;
        argv[k].p = b + start;
        argv[k].n = j - start;
        k++;
    }
}

/* The common case in one tight pass: a whole multibulk request of at most
 * STATIC_ARGS arguments at the start of [b, b + n). Fills static_args and
 * returns the bytes it occupies, or 0 for anything else (incomplete,
 * malformed, large), which the resumable parser then handles, errors
 * included. */
static u64 parse_whole_multibulk(const u8 *b, u64 n, u64 *argc_out) {
    i64 argc, len;
    u64 pos;
    if (length_line(b, 0, n, &argc, &pos) != 1 || argc <= 0 || argc > STATIC_ARGS)
        return 0;
    for (i64 i = 0; i < argc; i++) {
        u64 start;
        if (pos >= n || b[pos] != '$' || length_line(b, pos, n, &len, &start) != 1 || len < 0 ||
            (u64)len > n)
            return 0;
        pos = start + (u64)len;
        if (pos + 2 > n || b[pos] != '\r' || b[pos + 1] != '\n')
            return 0;
        static_args[i].p = b + start;
        static_args[i].n = (u64)len;
        pos += 2;
    }
    *argc_out = (u64)argc;
    return pos;
}

static const char oom_error[] = "OOM command not allowed when used memory > 'maxmemory'.";

/* Executes the complete commands at the start of [b, b + n). Returns the
 * bytes consumed, or -1 when the connection was closed. */
static i64 run_commands(struct conn *c, const u8 *b, u64 n) {
    u64 off = 0;
    while (off < n) {
        if (b[off] == '*' && c->ps.kind == KIND_NONE) {
            u64 argc;
            u64 used = parse_whole_multibulk(b + off, n - off, &argc);
            if (used) {
                ncommands++;
                execute_command(static_args, argc);
                off += used;
                if (cur_close) {
                    cur_close = 0;
                    close_current(c);
                    return -1;
                }
                continue;
            }
        }
        int r = parse(&c->ps, b + off, n - off);
        if (r == PARSE_MORE)
            break;
        if (r == PARSE_ERROR) {
            protocol_error(c, parse_error);
            return -1;
        }
        u64 argc = (u64)c->ps.argc;
        if (argc > 0) {
            struct arg *argv = static_args;
            u8 *unquoted = NULL_PTR;
            if (argc > STATIC_ARGS)
                argv = heap_alloc(argc * sizeof(*argv));
            if (c->ps.quoted)
                unquoted = heap_alloc(c->ps.pos);
            if (!argv || (c->ps.quoted && !unquoted)) {
                reply_error(oom_error);
            } else {
                if (argv != static_args || c->ps.resumed || c->ps.kind != KIND_MULTIBULK)
                    collect_args(&c->ps, b + off, argv, unquoted);
                ncommands++;
                execute_command(argv, argc);
            }
            if (argv != static_args)
                heap_free(argv);
            heap_free(unquoted);
        }
        off += c->ps.pos;
        parse_reset(&c->ps);
        if (cur_close) {
            cur_close = 0;
            close_current(c);
            return -1;
        }
    }
    return (i64)off;
}

/* Appends to the connection's buffer; on failure the connection is closed
 * with an error and 0 returned. */
static int buffer_append(struct conn *c, const u8 *p, u64 n) {
    u64 want = c->len + n;
    if (want > input_limit) {
        protocol_error(c, "request exceeds the input buffer limit");
        return 0;
    }
    if (want > c->cap) {
        u64 cap = MAX(want, c->ps.need); /* a known bulk: reserve it whole */
        if (cap < c->cap * 2)
            cap = c->cap * 2;
        cap = MAX(cap, MIN_BUFFER);
        cap = MIN(cap, MAX(input_limit, want));
        u8 *nb = heap_realloc(c->buf, cap);
        if (!nb) {
            reply_error(oom_error);
            close_current(c);
            return 0;
        }
        c->buf = nb;
        c->cap = heap_usable(nb);
    }
    mem_copy(c->buf + c->len, p, n);
    c->len = want;
    return 1;
}

void kv_data(u32 id, const u8 *p, u64 n) {
    struct conn *c = conn_find(id);
    if (!c || n == 0)
        return; /* the guest drops data of connections it does not know */
    cur = id;
    cur_conn = c;
    if (c->len == 0) {
        i64 used = run_commands(c, p, n);
        if (used >= 0 && (u64)used < n)
            buffer_append(c, p + used, n - (u64)used);
        return;
    }
    if (!buffer_append(c, p, n))
        return;
    if (c->ps.need > c->len)
        return; /* still inside a bulk string: nothing to parse yet */
    i64 used = run_commands(c, c->buf, c->len);
    if (used < 0)
        return;
    c->len -= (u64)used;
    if (c->len) {
        if (used)
            mem_move(c->buf, c->buf + used, c->len);
    } else if (c->cap > KEEP_BUFFER) {
        heap_free(c->buf);
        c->buf = NULL_PTR;
        c->cap = 0;
    }
}

void kv_open(u32 id) {
    if (id == 0)
        return;
    struct conn *c = conn_find(id);
    if (c) { /* a reused id: the old client is gone */
        conn_remove(c);
    } else if (nconns >= KV_MAX_CONNS) {
        static const char full[] = "-ERR max number of clients reached\r\n";
        out_data(id, full, sizeof(full) - 1);
        out_close(id);
        return;
    }
    c = conn_insert(id);
    parse_reset(&c->ps);
}

void kv_close(u32 id) {
    struct conn *c = conn_find(id);
    if (c)
        conn_remove(c);
}

int kv_init(void *heap, u64 size) {
    if (!heap_init(heap, size) || !store_init())
        return 0;
    mem_set(conns, 0, sizeof(conns));
    nconns = 0;
    ncommands = 0;
    /* One connection may hold up to half the heap in an unfinished request. */
    input_limit = MIN(heap_total() / 2, 1ULL << 30);
    batch_ns_valid = 0;
    boot_ns = plat_now_ns();
    return 1;
}

#define SWEEP_BUCKETS 128

void kv_idle(void) {
    kv_batch_begin();
    store_sweep_expired(SWEEP_BUCKETS);
}

void kv_get_stats(struct kv_stats *out) {
    out->keys = store_count();
    out->expires = store_expires();
    out->used_memory = heap_used();
    out->heap_size = heap_total();
    out->heap_blocks = heap_blocks();
    out->connections = nconns;
    out->commands = ncommands;
}
