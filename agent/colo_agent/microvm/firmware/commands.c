/* The commands: a subset of Redis string commands with Redis's replies and
 * error texts, so unmodified clients (redis-cli, redis-benchmark, redis-py)
 * work against the guest. */
#include "alloc.h"
#include "kv_internal.h"
#include "store.h"

typedef void (*command_fn)(struct arg *argv, u64 argc);

struct command {
    const char *name;  /* upper case, as matched */
    const char *lower; /* as Redis names it in errors */
    u8 len;
    i8 arity; /* >0: exactly; <0: at least -arity (command name included) */
    command_fn fn;
};

static const char err_syntax[] = "ERR syntax error";
static const char err_not_int[] = "ERR value is not an integer or out of range";
static const char err_overflow[] = "ERR increment or decrement would overflow";
static const char err_oom[] = "OOM command not allowed when used memory > 'maxmemory'.";

/* A small text builder for error messages and INFO. */
struct text {
    u8 buf[1024];
    usize n;
};

static void text_bytes(struct text *t, const u8 *p, u64 n) {
    for (u64 i = 0; i < n && t->n < sizeof(t->buf) - 1; i++)
        t->buf[t->n++] = p[i];
}

static void text_str(struct text *t, const char *s) {
    while (*s && t->n < sizeof(t->buf) - 1)
        t->buf[t->n++] = (u8)*s++;
}

static void text_u64(struct text *t, u64 v) {
    u8 digits[20];
    text_bytes(t, digits, fmt_u64(v, digits));
}

/* Client bytes quoted in an error: CR/LF would end the reply early. */
static void text_sanitized(struct text *t, const u8 *p, u64 n, u64 max) {
    for (u64 i = 0; i < n && i < max && t->n < sizeof(t->buf) - 1; i++)
        t->buf[t->n++] = p[i] < 0x20 ? (u8)' ' : p[i];
}

static void reply_text_error(struct text *t) {
    t->buf[t->n] = 0;
    reply_error((const char *)t->buf);
}

static void wrong_arity(const struct command *c) {
    struct text t = {.n = 0};
    text_str(&t, "ERR wrong number of arguments for '");
    text_str(&t, c->lower);
    text_str(&t, "' command");
    reply_text_error(&t);
}

static int arg_is(const struct arg *a, const char *upper) { return eq_nocase(a->p, a->n, upper); }

static void reply_ok(void) { reply_lit("+OK\r\n"); }

static void reply_value(const struct entry *e) {
    if (e)
        reply_bulk(e->data + e->klen, e->vlen);
    else
        reply_nil();
}

/* Absolute expiry in ms from a relative amount in `unit_ms`; 0 when invalid. */
static int expire_at(const struct arg *a, i64 unit_ms, int *bad_int, i64 *out) {
    i64 v;
    *bad_int = 0;
    if (!parse_i64(a->p, a->n, &v)) {
        *bad_int = 1;
        return 0;
    }
    if (v <= 0 || v > INT64_MAX_V / unit_ms)
        return 0;
    v *= unit_ms;
    i64 now = kv_now_ms();
    if (v > INT64_MAX_V - now)
        return 0;
    *out = now + v;
    return 1;
}

/* --- connection and server ---------------------------------------------- */

static void cmd_ping(struct arg *argv, u64 argc) {
    if (argc > 2) {
        reply_error("ERR wrong number of arguments for 'ping' command");
        return;
    }
    if (argc == 2)
        reply_bulk(argv[1].p, argv[1].n);
    else
        reply_lit("+PONG\r\n");
}

static void cmd_echo(struct arg *argv, u64 argc) {
    (void)argc;
    reply_bulk(argv[1].p, argv[1].n);
}

static void cmd_quit(struct arg *argv, u64 argc) {
    (void)argv;
    (void)argc;
    reply_ok();
    request_close();
}

static void cmd_select(struct arg *argv, u64 argc) {
    (void)argc;
    i64 db;
    if (!parse_i64(argv[1].p, argv[1].n, &db))
        reply_error(err_not_int);
    else if (db != 0)
        reply_error("ERR DB index is out of range");
    else
        reply_ok();
}

static void cmd_client(struct arg *argv, u64 argc) {
    const struct arg *sub = &argv[1];
    if (arg_is(sub, "SETNAME") || arg_is(sub, "SETINFO"))
        reply_ok();
    else if (arg_is(sub, "GETNAME"))
        reply_nil();
    else if (arg_is(sub, "ID"))
        reply_int(current_conn());
    else {
        struct text t = {.n = 0};
        text_str(&t, "ERR unknown subcommand '");
        text_sanitized(&t, sub->p, sub->n, 64);
        text_str(&t, "'");
        reply_text_error(&t);
    }
    (void)argc;
}

static u64 command_count(void);

/* HELLO [protover [AUTH user pass] [SETNAME name]]: switches the connection
 * to RESP2 or RESP3 (new clients, redis-py among them, start with HELLO 3).
 * No password is configured, so AUTH is accepted as Redis accepts it then. */
static void cmd_hello(struct arg *argv, u64 argc) {
    int version = current_protocol();
    u64 i = 1;
    if (argc >= 2) {
        i64 v;
        if (!parse_i64(argv[1].p, argv[1].n, &v)) {
            reply_error("ERR Protocol version is not an integer or out of range");
            return;
        }
        if (v != 2 && v != 3) {
            reply_error("NOPROTO unsupported protocol version");
            return;
        }
        version = (int)v;
        i = 2;
    }
    for (; i < argc; i++) {
        if (arg_is(&argv[i], "AUTH") && i + 2 < argc)
            i += 2;
        else if (arg_is(&argv[i], "SETNAME") && i + 1 < argc)
            i += 1;
        else {
            struct text t = {.n = 0};
            text_str(&t, "ERR Syntax error in HELLO option '");
            text_sanitized(&t, argv[i].p, argv[i].n, 64);
            text_str(&t, "'");
            reply_text_error(&t);
            return;
        }
    }
    set_protocol(version);
    reply_map(7);
    reply_bulk((const u8 *)"server", 6);
    reply_bulk((const u8 *)"colo-kv", 7);
    reply_bulk((const u8 *)"version", 7);
    reply_bulk((const u8 *)KV_VERSION, sizeof(KV_VERSION) - 1);
    reply_bulk((const u8 *)"proto", 5);
    reply_int(version);
    reply_bulk((const u8 *)"id", 2);
    reply_int(current_conn());
    reply_bulk((const u8 *)"mode", 4);
    reply_bulk((const u8 *)"standalone", 10);
    reply_bulk((const u8 *)"role", 4);
    reply_bulk((const u8 *)"master", 6);
    reply_bulk((const u8 *)"modules", 7);
    reply_array(0);
}

static void cmd_command(struct arg *argv, u64 argc) {
    /* No command table is published: clients (redis-cli hints) cope with an
     * empty one and fall back to plain behaviour. */
    if (argc >= 2 && arg_is(&argv[1], "COUNT"))
        reply_int((i64)command_count());
    else
        reply_array(0);
}

static void cmd_config(struct arg *argv, u64 argc) {
    if (arg_is(&argv[1], "GET")) {
        if (argc < 3) {
            reply_error("ERR wrong number of arguments for 'config|get' command");
            return;
        }
        struct kv_stats s;
        kv_get_stats(&s);
        u8 maxmemory[20], maxclients[20];
        usize maxmemory_n = fmt_u64(s.heap_size, maxmemory);
        usize maxclients_n = fmt_u64(KV_MAX_CONNS, maxclients);
        /* What benchmark tools ask for; everything else is unknown (omitted,
         * as Redis omits parameters that match nothing). */
        struct {
            const char *name;
            const u8 *value;
            u64 n;
        } known[] = {
            {"save", (const u8 *)"", 0},
            {"appendonly", (const u8 *)"no", 2},
            {"databases", (const u8 *)"1", 1},
            {"maxmemory", maxmemory, maxmemory_n},
            {"maxclients", maxclients, maxclients_n},
        };
        u64 matches = 0;
        u8 hit[ARRAY_LEN(known)] = {0};
        for (usize k = 0; k < ARRAY_LEN(known); k++) {
            for (u64 i = 2; i < argc && !hit[k]; i++) {
                u64 ln = 0;
                while (known[k].name[ln])
                    ln++;
                if (argv[i].n != ln)
                    continue;
                u64 j = 0;
                while (j < ln && ascii_upper(argv[i].p[j]) == ascii_upper((u8)known[k].name[j]))
                    j++;
                if (j == ln) {
                    hit[k] = 1;
                    matches++;
                }
            }
        }
        reply_map(matches);
        for (usize k = 0; k < ARRAY_LEN(known); k++) {
            if (!hit[k])
                continue;
            u64 ln = 0;
            while (known[k].name[ln])
                ln++;
            reply_bulk((const u8 *)known[k].name, ln);
            reply_bulk(known[k].value, known[k].n);
        }
    } else if (arg_is(&argv[1], "RESETSTAT")) {
        reply_ok();
    } else if (arg_is(&argv[1], "SET")) {
        reply_error("ERR CONFIG SET is not supported by this server");
    } else {
        struct text t = {.n = 0};
        text_str(&t, "ERR unknown subcommand '");
        text_sanitized(&t, argv[1].p, argv[1].n, 64);
        text_str(&t, "'");
        reply_text_error(&t);
    }
}

static void cmd_dbsize(struct arg *argv, u64 argc) {
    (void)argv;
    (void)argc;
    reply_int((i64)store_count());
}

static void cmd_flushall(struct arg *argv, u64 argc) {
    if (argc > 2 || (argc == 2 && !arg_is(&argv[1], "ASYNC") && !arg_is(&argv[1], "SYNC"))) {
        reply_error(err_syntax);
        return;
    }
    store_flush();
    reply_ok();
}

static void cmd_time(struct arg *argv, u64 argc) {
    (void)argv;
    (void)argc;
    u64 ns = (u64)plat_now_ns(); /* fresh: TIME is about now, not the batch */
    u8 sec[20], usec[20];
    usize sn = fmt_u64(ns / 1000000000ULL, sec);
    usize un = fmt_u64((ns % 1000000000ULL) / 1000ULL, usec);
    reply_array(2);
    reply_bulk(sec, sn);
    reply_bulk(usec, un);
}

enum { INFO_SERVER = 1, INFO_CLIENTS = 2, INFO_MEMORY = 4, INFO_STATS = 8, INFO_KEYSPACE = 16 };

/* INFO [section ...]: the named sections (case-insensitive), all of them
 * for none, "all", "default" or "everything"; unknown names add nothing. */
static void cmd_info(struct arg *argv, u64 argc) {
    static const struct {
        const char *name;
        unsigned bits;
    } sections[] = {
        {"SERVER", INFO_SERVER}, {"CLIENTS", INFO_CLIENTS}, {"MEMORY", INFO_MEMORY},
        {"STATS", INFO_STATS},   {"KEYSPACE", INFO_KEYSPACE}, {"ALL", ~0u},
        {"DEFAULT", ~0u},        {"EVERYTHING", ~0u},
    };
    unsigned want = argc == 1 ? ~0u : 0;
    for (u64 i = 1; i < argc; i++) {
        for (usize k = 0; k < ARRAY_LEN(sections); k++) {
            if (arg_is(&argv[i], sections[k].name))
                want |= sections[k].bits;
        }
    }
    struct kv_stats s;
    kv_get_stats(&s);
    struct text t = {.n = 0};
    if (want & INFO_SERVER) {
        u64 now = (u64)kv_now_ms() * 1000000ULL;
        u64 up = now > boot_time_ns() ? (now - boot_time_ns()) / 1000000000ULL : 0;
        text_str(&t, "# Server\r\ncolo_version:" KV_VERSION "\r\nredis_mode:standalone\r\nuptime_in_seconds:");
        text_u64(&t, up);
        text_str(&t, "\r\nuptime_in_days:");
        text_u64(&t, up / 86400);
        text_str(&t, "\r\n\r\n");
    }
    if (want & INFO_CLIENTS) {
        text_str(&t, "# Clients\r\nconnected_clients:");
        text_u64(&t, s.connections);
        text_str(&t, "\r\nmaxclients:");
        text_u64(&t, KV_MAX_CONNS);
        text_str(&t, "\r\n\r\n");
    }
    if (want & INFO_MEMORY) {
        text_str(&t, "# Memory\r\nused_memory:");
        text_u64(&t, s.used_memory);
        text_str(&t, "\r\nmaxmemory:");
        text_u64(&t, s.heap_size);
        text_str(&t, "\r\n\r\n");
    }
    if (want & INFO_STATS) {
        text_str(&t, "# Stats\r\ntotal_commands_processed:");
        text_u64(&t, s.commands);
        text_str(&t, "\r\n\r\n");
    }
    if (want & INFO_KEYSPACE) {
        text_str(&t, "# Keyspace\r\n");
        if (s.keys) {
            text_str(&t, "db0:keys=");
            text_u64(&t, s.keys);
            text_str(&t, ",expires=");
            text_u64(&t, s.expires);
            text_str(&t, ",avg_ttl=0\r\n");
        }
    }
    reply_bulk(t.buf, t.n);
}

/* --- strings ------------------------------------------------------------ */

static void cmd_get(struct arg *argv, u64 argc) {
    (void)argc;
    reply_value(store_get(argv[1].p, argv[1].n));
}

#define SET_NX 1
#define SET_XX 2
#define SET_GET 4
#define SET_KEEPTTL 8
#define SET_EXPIRE 16

static void cmd_set(struct arg *argv, u64 argc) {
    unsigned flags = 0;
    i64 expire_ms = 0;
    for (u64 i = 3; i < argc; i++) {
        struct arg *a = &argv[i];
        unsigned f = 0;
        i64 unit = 0;
        int absolute = 0;
        if (arg_is(a, "NX"))
            f = SET_NX;
        else if (arg_is(a, "XX"))
            f = SET_XX;
        else if (arg_is(a, "GET"))
            f = SET_GET;
        else if (arg_is(a, "KEEPTTL"))
            f = SET_KEEPTTL;
        else if (arg_is(a, "EX"))
            unit = 1000;
        else if (arg_is(a, "PX"))
            unit = 1;
        else if (arg_is(a, "EXAT"))
            unit = 1000, absolute = 1;
        else if (arg_is(a, "PXAT"))
            unit = 1, absolute = 1;
        if (unit) {
            if (i + 1 >= argc || (flags & (SET_EXPIRE | SET_KEEPTTL))) {
                reply_error(err_syntax);
                return;
            }
            i++;
            int bad_int;
            if (absolute) {
                i64 v;
                if (!parse_i64(argv[i].p, argv[i].n, &v)) {
                    reply_error(err_not_int);
                    return;
                }
                if (v <= 0 || v > INT64_MAX_V / unit) {
                    reply_error("ERR invalid expire time in 'set' command");
                    return;
                }
                expire_ms = v * unit;
            } else if (!expire_at(&argv[i], unit, &bad_int, &expire_ms)) {
                reply_error(bad_int ? err_not_int : "ERR invalid expire time in 'set' command");
                return;
            }
            f = SET_EXPIRE;
        }
        if (!f || (flags & f) || ((flags | f) & (SET_NX | SET_XX)) == (SET_NX | SET_XX) ||
            ((flags | f) & (SET_EXPIRE | SET_KEEPTTL)) == (SET_EXPIRE | SET_KEEPTTL)) {
            reply_error(err_syntax);
            return;
        }
        flags |= f;
    }
    const struct arg *k = &argv[1], *v = &argv[2];
    if (!(flags & (SET_NX | SET_XX | SET_GET | SET_KEEPTTL)) && (!expire_ms || expire_ms > kv_now_ms())) {
        if (store_upsert(k->p, k->n, v->p, v->n, expire_ms))
            reply_ok();
        else
            reply_error(err_oom);
        return;
    }
    struct entry *old = store_get(k->p, k->n);
    if (((flags & SET_NX) && old) || ((flags & SET_XX) && !old)) {
        if (flags & SET_GET)
            reply_value(old);
        else
            reply_nil();
        return;
    }
    struct entry *e = entry_new(k->p, k->n, v->p, v->n);
    if (!e) {
        reply_error(err_oom);
        return;
    }
    if (flags & SET_GET)
        reply_value(old);
    else
        reply_ok();
    e->expire_ms = (flags & SET_KEEPTTL) && old ? old->expire_ms : expire_ms;
    if (e->expire_ms && e->expire_ms <= kv_now_ms()) { /* EXAT/PXAT in the past */
        entry_free(e);
        store_del(k->p, k->n);
        return;
    }
    store_put(e);
}

static void cmd_setnx(struct arg *argv, u64 argc) {
    (void)argc;
    if (store_get(argv[1].p, argv[1].n)) {
        reply_int(0);
        return;
    }
    struct entry *e = entry_new(argv[1].p, argv[1].n, argv[2].p, argv[2].n);
    if (!e) {
        reply_error(err_oom);
        return;
    }
    store_put(e);
    reply_int(1);
}

static void set_with_expire(struct arg *argv, i64 unit, const char *err_expire) {
    int bad_int;
    i64 when;
    if (!expire_at(&argv[2], unit, &bad_int, &when)) {
        reply_error(bad_int ? err_not_int : err_expire);
        return;
    }
    struct entry *e = entry_new(argv[1].p, argv[1].n, argv[3].p, argv[3].n);
    if (!e) {
        reply_error(err_oom);
        return;
    }
    e->expire_ms = when;
    store_put(e);
    reply_ok();
}

static void cmd_setex(struct arg *argv, u64 argc) {
    (void)argc;
    set_with_expire(argv, 1000, "ERR invalid expire time in 'setex' command");
}

static void cmd_psetex(struct arg *argv, u64 argc) {
    (void)argc;
    set_with_expire(argv, 1, "ERR invalid expire time in 'psetex' command");
}

static void cmd_getset(struct arg *argv, u64 argc) {
    (void)argc;
    struct entry *old = store_get(argv[1].p, argv[1].n);
    struct entry *e = entry_new(argv[1].p, argv[1].n, argv[2].p, argv[2].n);
    if (!e) {
        reply_error(err_oom);
        return;
    }
    reply_value(old);
    store_put(e);
}

static void cmd_del(struct arg *argv, u64 argc) {
    i64 n = 0;
    for (u64 i = 1; i < argc; i++)
        n += store_del(argv[i].p, argv[i].n);
    reply_int(n);
}

static void cmd_exists(struct arg *argv, u64 argc) {
    i64 n = 0;
    for (u64 i = 1; i < argc; i++)
        n += store_get(argv[i].p, argv[i].n) != NULL_PTR;
    reply_int(n);
}

static void incr_by(const struct arg *key, i64 by) {
    struct entry *e = store_get(key->p, key->n);
    i64 v = 0;
    if (e && !parse_i64(entry_val(e), e->vlen, &v)) {
        reply_error(err_not_int);
        return;
    }
    if ((by > 0 && v > INT64_MAX_V - by) || (by < 0 && v < INT64_MIN_V - by)) {
        reply_error(err_overflow);
        return;
    }
    v += by;
    u8 digits[24];
    usize n = fmt_i64(v, digits);
    if (e) {
        if (!store_set_value(e, digits, n)) {
            reply_error(err_oom);
            return;
        }
    } else {
        struct entry *ne = entry_new(key->p, key->n, digits, n);
        if (!ne) {
            reply_error(err_oom);
            return;
        }
        store_put(ne);
    }
    reply_int(v);
}

static void cmd_incr(struct arg *argv, u64 argc) {
    (void)argc;
    incr_by(&argv[1], 1);
}

static void cmd_decr(struct arg *argv, u64 argc) {
    (void)argc;
    incr_by(&argv[1], -1);
}

static void cmd_incrby(struct arg *argv, u64 argc) {
    (void)argc;
    i64 by;
    if (!parse_i64(argv[2].p, argv[2].n, &by))
        reply_error(err_not_int);
    else
        incr_by(&argv[1], by);
}

static void cmd_decrby(struct arg *argv, u64 argc) {
    (void)argc;
    i64 by;
    if (!parse_i64(argv[2].p, argv[2].n, &by))
        reply_error(err_not_int);
    else if (by == INT64_MIN_V)
        reply_error("ERR decrement would overflow");
    else
        incr_by(&argv[1], -by);
}

static void cmd_mget(struct arg *argv, u64 argc) {
    reply_array(argc - 1);
    for (u64 i = 1; i < argc; i++)
        reply_value(store_get(argv[i].p, argv[i].n));
}

/* All or nothing: every entry is allocated before any is linked, so memory
 * running out half way leaves the keyspace as it was. */
static void mset(struct arg *argv, u64 argc, int nx, const struct command *self) {
    if (argc % 2 == 0) {
        wrong_arity(self);
        return;
    }
    u64 pairs = (argc - 1) / 2;
    if (nx) {
        for (u64 i = 0; i < pairs; i++) {
            if (store_get(argv[1 + 2 * i].p, argv[1 + 2 * i].n)) {
                reply_int(0);
                return;
            }
        }
    }
    struct entry *local[64];
    struct entry **fresh = pairs <= ARRAY_LEN(local) ? local : heap_alloc(pairs * sizeof(*fresh));
    if (!fresh) {
        reply_error(err_oom);
        return;
    }
    u64 made = 0;
    for (; made < pairs; made++) {
        const struct arg *k = &argv[1 + 2 * made], *v = &argv[2 + 2 * made];
        fresh[made] = entry_new(k->p, k->n, v->p, v->n);
        if (!fresh[made])
            break;
    }
    if (made < pairs) {
        while (made)
            entry_free(fresh[--made]);
        reply_error(err_oom);
    } else {
        for (u64 i = 0; i < pairs; i++)
            store_put(fresh[i]);
        if (nx)
            reply_int(1);
        else
            reply_ok();
    }
    if (fresh != local)
        heap_free(fresh);
}

static const struct command *find_command(const struct arg *name);

static void cmd_mset(struct arg *argv, u64 argc) { mset(argv, argc, 0, find_command(&argv[0])); }
static void cmd_msetnx(struct arg *argv, u64 argc) { mset(argv, argc, 1, find_command(&argv[0])); }

static void cmd_strlen(struct arg *argv, u64 argc) {
    (void)argc;
    struct entry *e = store_get(argv[1].p, argv[1].n);
    reply_int(e ? (i64)e->vlen : 0);
}

static void cmd_append(struct arg *argv, u64 argc) {
    (void)argc;
    const struct arg *k = &argv[1], *v = &argv[2];
    struct entry *e = store_get(k->p, k->n);
    if (!e) {
        e = entry_new(k->p, k->n, v->p, v->n);
        if (!e) {
            reply_error(err_oom);
            return;
        }
        store_put(e);
        reply_int((i64)v->n);
        return;
    }
    u64 total = (u64)e->vlen + v->n;
    if (total > 512ULL << 20) {
        reply_error("ERR string exceeds maximum allowed size (proto-max-bulk-len)");
        return;
    }
    struct entry *n = entry_new(k->p, k->n, NULL_PTR, 0);
    if (n)
        n = heap_realloc(n, sizeof(*n) + k->n + total);
    if (!n) {
        reply_error(err_oom);
        return;
    }
    mem_copy(entry_val(n), entry_val(e), e->vlen);
    mem_copy(entry_val(n) + e->vlen, v->p, v->n);
    n->vlen = (u32)total;
    n->expire_ms = e->expire_ms;
    store_put(n);
    reply_int((i64)total);
}

static void cmd_type(struct arg *argv, u64 argc) {
    (void)argc;
    if (store_get(argv[1].p, argv[1].n))
        reply_lit("+string\r\n");
    else
        reply_lit("+none\r\n");
}

/* --- expiry ------------------------------------------------------------- */

static void ttl(struct arg *argv, i64 unit) {
    struct entry *e = store_get(argv[1].p, argv[1].n);
    if (!e)
        reply_int(-2);
    else if (!e->expire_ms)
        reply_int(-1);
    else
        reply_int((e->expire_ms - kv_now_ms() + unit / 2) / unit);
}

static void cmd_ttl(struct arg *argv, u64 argc) {
    (void)argc;
    ttl(argv, 1000);
}

static void cmd_pttl(struct arg *argv, u64 argc) {
    (void)argc;
    ttl(argv, 1);
}

static void expire(struct arg *argv, i64 unit, const char *err_expire) {
    i64 v;
    if (!parse_i64(argv[2].p, argv[2].n, &v)) {
        reply_error(err_not_int);
        return;
    }
    struct entry *e = store_get(argv[1].p, argv[1].n);
    if (!e) {
        reply_int(0);
        return;
    }
    i64 now = kv_now_ms();
    if (v > 0 && (v > INT64_MAX_V / unit || v * unit > INT64_MAX_V - now)) {
        reply_error(err_expire);
        return;
    }
    if (v <= 0) /* a time in the past deletes the key, as in Redis */
        store_del(argv[1].p, argv[1].n);
    else
        store_set_expire(e, now + v * unit);
    reply_int(1);
}

static void cmd_expire(struct arg *argv, u64 argc) {
    (void)argc;
    expire(argv, 1000, "ERR invalid expire time in 'expire' command");
}

static void cmd_pexpire(struct arg *argv, u64 argc) {
    (void)argc;
    expire(argv, 1, "ERR invalid expire time in 'pexpire' command");
}

static void cmd_persist(struct arg *argv, u64 argc) {
    (void)argc;
    struct entry *e = store_get(argv[1].p, argv[1].n);
    if (!e || !e->expire_ms) {
        reply_int(0);
        return;
    }
    store_set_expire(e, 0);
    reply_int(1);
}

/* --- dispatch ----------------------------------------------------------- */

#define CMD(upper, lower, arity, fn) {upper, lower, sizeof(upper) - 1, arity, fn}

/* The hottest commands first: lookup is a linear scan filtered by length. */
static const struct command commands[] = {
    CMD("GET", "get", 2, cmd_get),
    CMD("SET", "set", -3, cmd_set),
    CMD("INCR", "incr", 2, cmd_incr),
    CMD("PING", "ping", -1, cmd_ping),
    CMD("MGET", "mget", -2, cmd_mget),
    CMD("MSET", "mset", -3, cmd_mset),
    CMD("DEL", "del", -2, cmd_del),
    CMD("EXISTS", "exists", -2, cmd_exists),
    CMD("DECR", "decr", 2, cmd_decr),
    CMD("INCRBY", "incrby", 3, cmd_incrby),
    CMD("DECRBY", "decrby", 3, cmd_decrby),
    CMD("ECHO", "echo", 2, cmd_echo),
    CMD("SETNX", "setnx", 3, cmd_setnx),
    CMD("SETEX", "setex", 4, cmd_setex),
    CMD("PSETEX", "psetex", 4, cmd_psetex),
    CMD("GETSET", "getset", 3, cmd_getset),
    CMD("MSETNX", "msetnx", -3, cmd_msetnx),
    CMD("UNLINK", "unlink", -2, cmd_del),
    CMD("STRLEN", "strlen", 2, cmd_strlen),
    CMD("APPEND", "append", 3, cmd_append),
    CMD("TYPE", "type", 2, cmd_type),
    CMD("TTL", "ttl", 2, cmd_ttl),
    CMD("PTTL", "pttl", 2, cmd_pttl),
    CMD("EXPIRE", "expire", 3, cmd_expire),
    CMD("PEXPIRE", "pexpire", 3, cmd_pexpire),
    CMD("PERSIST", "persist", 2, cmd_persist),
    CMD("DBSIZE", "dbsize", 1, cmd_dbsize),
    CMD("FLUSHALL", "flushall", -1, cmd_flushall),
    CMD("FLUSHDB", "flushdb", -1, cmd_flushall),
    CMD("TIME", "time", 1, cmd_time),
    CMD("INFO", "info", -1, cmd_info),
    CMD("CONFIG", "config", -2, cmd_config),
    CMD("COMMAND", "command", -1, cmd_command),
    CMD("SELECT", "select", 2, cmd_select),
    CMD("CLIENT", "client", -2, cmd_client),
    CMD("QUIT", "quit", -1, cmd_quit),
    CMD("HELLO", "hello", -1, cmd_hello),
};

static u64 command_count(void) { return ARRAY_LEN(commands); }

static const struct command *find_command(const struct arg *name) {
    for (usize i = 0; i < ARRAY_LEN(commands); i++) {
        if (commands[i].len == name->n && eq_nocase(name->p, name->n, commands[i].name))
            return &commands[i];
    }
    return NULL_PTR;
}

void execute_command(struct arg *argv, u64 argc) {
    const struct command *c = find_command(&argv[0]);
    if (!c) {
        struct text t = {.n = 0};
        text_str(&t, "ERR unknown command '");
        text_sanitized(&t, argv[0].p, argv[0].n, 128);
        text_str(&t, "', with args beginning with: ");
        for (u64 i = 1; i < argc && t.n < 200; i++) {
            text_str(&t, "'");
            text_sanitized(&t, argv[i].p, argv[i].n, 128);
            text_str(&t, "' ");
        }
        reply_text_error(&t);
        return;
    }
    if ((c->arity > 0 && argc != (u64)c->arity) || (c->arity < 0 && argc < (u64)-c->arity)) {
        wrong_arity(c);
        return;
    }
    c->fn(argv, argc);
}
