/* The keyspace: a chained hash table with incremental resizing.
 *
 * One heap block per key holds the entry header, the key and the value, so
 * a key costs one allocation and DEL one free. While the table resizes, each
 * operation moves a couple of buckets to the new table, so no single
 * command pays for rehashing millions of keys. */
#ifndef COLO_STORE_H
#define COLO_STORE_H

#include "util.h"

struct entry {
    struct entry *next;
    u64 hash;
    i64 expire_ms; /* absolute virtual time in ms; 0 = no expiry */
    u32 klen;
    u32 vlen;
    u8 data[]; /* key, then value */
};

static inline u8 *entry_key(struct entry *e) { return e->data; }
static inline u8 *entry_val(struct entry *e) { return e->data + e->klen; }

/* Virtual time in ms for expiry decisions (kv core; read lazily). */
i64 kv_now_ms(void);

int store_init(void);
u64 store_hash(const u8 *p, u64 n);
/* A new, unlinked entry; NULL when memory is short. */
struct entry *entry_new(const u8 *k, u64 klen, const u8 *v, u64 vlen);
void entry_free(struct entry *e);
/* The live entry for a key; an expired one is deleted on the way. */
struct entry *store_get(const u8 *k, u64 klen);
/* Links `e`, replacing (and freeing) an entry with the same key. */
void store_put(struct entry *e);
/* SET: the key gets this value and expiry, rewritten in place when the old
 * block fits. 0 when memory is short (and nothing changed). */
int store_upsert(const u8 *k, u64 klen, const u8 *v, u64 vlen, i64 expire_ms);
/* Replaces the value of a linked entry, in place when it fits; returns the
 * (possibly moved) entry or NULL when memory is short (the old value stays). */
struct entry *store_set_value(struct entry *e, const u8 *v, u64 vlen);
void store_set_expire(struct entry *e, i64 expire_ms);
/* 1 if a live key was deleted. */
int store_del(const u8 *k, u64 klen);
u64 store_count(void);
/* Keys with an expiry; read by the guest's idle loop without a call. */
extern u64 store_expires_count;
/* Active expiry: deletes expired keys in the next `max_buckets` buckets
 * (a cursor goes round the table), after moving on a resize in progress.
 * Returns how many it deleted. */
u64 store_sweep_expired(u64 max_buckets);
u64 store_expires(void);
/* Frees every key and shrinks the table back to its initial size. */
void store_flush(void);

#endif
