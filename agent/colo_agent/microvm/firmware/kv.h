/* The key-value service, free of any port I/O.
 *
 * The platform feeds it connection events (kv_open / kv_data / kv_close) and
 * provides three hooks: where reply bytes go (out_data, out_close) and the
 * virtual clock (plat_now_ns). The guest wires them to the NIC rings and the
 * clock ports; the host test driver to in-memory rings and a fake clock. */
#ifndef COLO_KV_H
#define COLO_KV_H

#include "util.h"

/* Connections served at once; one more is refused with an error reply. */
#define KV_MAX_CONNS 4096
#define KV_VERSION "0.1.0"

/* --- hooks the platform implements ------------------------------------- */
/* Append reply bytes for `conn`; never fails (the platform flushes when full). */
void out_data(u32 conn, const void *p, u64 n);
/* The service closes `conn`; nothing more is sent on it. */
void out_close(u32 conn);
/* Virtual clock in ns, monotonic. Called only by commands that need time. */
u64 plat_now_ns(void);

/* --- the service -------------------------------------------------------- */
/* Takes [heap, heap + size) for all its state. Returns 0 if it is too small. */
int kv_init(void *heap, u64 size);
void kv_open(u32 conn);
void kv_data(u32 conn, const u8 *p, u64 n);
void kv_close(u32 conn);
/* Called once per batch of events: the clock is read at most once per batch. */
void kv_batch_begin(void);

/* Idle-time work: deletes some expired keys nobody asked for again (lazy
 * expiry alone would keep their memory). Worth calling every
 * KV_IDLE_INTERVAL_US while keys with an expiry exist (store.h). */
#define KV_IDLE_INTERVAL_US 100000u
void kv_idle(void);

struct kv_stats {
    u64 keys;
    u64 expires;
    u64 used_memory;  /* bytes of heap in use, headers included */
    u64 heap_size;    /* bytes of heap under management */
    u64 heap_blocks;  /* allocated blocks */
    u64 connections;  /* open connections */
    u64 commands;     /* commands executed since boot */
};
void kv_get_stats(struct kv_stats *out);

#endif
