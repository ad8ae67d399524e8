/* The keyspace (see store.h). */
#include "store.h"

#include "alloc.h"

#define INITIAL_BUCKETS 64ULL
/* Buckets moved per operation while resizing; the new table is at least
 * twice the old one, so two per insert finish well before it fills. */
#define REHASH_STEP 2
#define REHASH_EMPTY_VISITS 20

struct table {
    struct entry **b;
    u64 mask; /* buckets - 1; 0 with b == NULL when unallocated */
    u64 used;
};

static struct table ht[2];
static i64 rehash_idx = -1; /* next bucket of ht[0] to move; -1 = not resizing */
u64 store_expires_count;
static u64 sweep_cursor;

static inline u64 rotl(u64 x, int r) { return (x << r) | (x >> (64 - r)); }

/* A fixed-seed 64-bit hash (multiply-rotate rounds, murmur3's finalizer).
 * No random seed: two replicas fed the same commands must lay their tables
 * out the same way. */
u64 store_hash(const u8 *p, u64 n) {
    const u64 m1 = 0x87C37B91114253D5ULL, m2 = 0x4CF5AD432745937FULL;
    u64 h = 0x9E3779B97F4A7C15ULL ^ (n * 0xC2B2AE3D27D4EB4FULL);
    while (n >= 8) {
        u64 w;
        mem_copy(&w, p, 8);
        h ^= rotl(w * m1, 31) * m2;
        h = rotl(h, 27) * 5 + 0x52DCE729;
        p += 8;
        n -= 8;
    }
    if (n) {
        u64 w = 0;
        for (u64 i = 0; i < n; i++)
            w |= (u64)p[i] << (8 * i);
        h ^= rotl(w * m1, 31) * m2;
    }
    h ^= h >> 33;
    h *= 0xFF51AFD7ED558CCDULL;
    h ^= h >> 33;
    h *= 0xC4CEB9FE1A85EC53ULL;
    h ^= h >> 33;
    return h;
}

static int table_alloc(struct table *t, u64 buckets) {
    struct entry **b = heap_alloc(buckets * sizeof(*b));
    if (!b)
        return 0;
    mem_set(b, 0, buckets * sizeof(*b));
    t->b = b;
    t->mask = buckets - 1;
    t->used = 0;
    return 1;
}

int store_init(void) {
    mem_set(ht, 0, sizeof(ht));
    rehash_idx = -1;
    store_expires_count = 0;
    return table_alloc(&ht[0], INITIAL_BUCKETS);
}

static void rehash_finish(void) {
    heap_free(ht[0].b);
    ht[0] = ht[1];
    mem_set(&ht[1], 0, sizeof(ht[1]));
    rehash_idx = -1;
}

static void rehash_step(void) {
    if (rehash_idx < 0)
        return;
    int moved = 0, empty = 0;
    while (moved < REHASH_STEP && ht[0].used) {
        struct entry *e = ht[0].b[rehash_idx];
        if (!e) {
            rehash_idx++;
            if (++empty >= REHASH_EMPTY_VISITS)
                return;
            continue;
        }
        while (e) {
            struct entry *next = e->next;
            u64 i = e->hash & ht[1].mask;
            e->next = ht[1].b[i];
            ht[1].b[i] = e;
            ht[0].used--;
            ht[1].used++;
            e = next;
        }
        ht[0].b[rehash_idx++] = NULL_PTR;
        moved++;
    }
    if (!ht[0].used)
        rehash_finish();
}

/* Starts moving to a table of `buckets`; without memory for it the table
 * just keeps its size (longer chains, no failure). */
static void resize_to(u64 buckets) {
    if (rehash_idx >= 0 || buckets == ht[0].mask + 1)
        return;
    if (!table_alloc(&ht[1], buckets))
        return;
    rehash_idx = 0;
    if (!ht[0].used)
        rehash_finish();
}

/* The link pointing at the entry for a key (and the table holding it). */
static struct entry **find_link(const u8 *k, u64 klen, u64 h, int *table) {
    for (int t = 0; t < 2; t++) {
        if (!ht[t].b)
            break;
        struct entry **link = &ht[t].b[h & ht[t].mask];
        for (struct entry *e = *link; e; link = &e->next, e = e->next) {
            if (e->hash == h && e->klen == klen && mem_cmp(e->data, k, klen) == 0) {
                *table = t;
                return link;
            }
        }
        if (rehash_idx < 0)
            break;
    }
    return NULL_PTR;
}

static void unlink_free(struct entry **link, int table) {
    struct entry *e = *link;
    *link = e->next;
    ht[table].used--;
    if (e->expire_ms)
        store_expires_count--;
    heap_free(e);
}

/* After a delete: finish a resize whose old table just emptied, and start
 * shrinking a mostly empty table (an empty keyspace ends at the initial
 * size at once, so deleting every key returns all the table's memory). */
static void maybe_shrink(void) {
    if (rehash_idx >= 0 && !ht[0].used)
        rehash_finish();
    u64 size = ht[0].mask + 1;
    if (rehash_idx < 0 && size > INITIAL_BUCKETS && ht[0].used < size / 8) {
        u64 target = INITIAL_BUCKETS;
        while (target < ht[0].used * 2)
            target <<= 1;
        resize_to(target);
    }
}

static inline int expired(const struct entry *e) {
    return e->expire_ms && kv_now_ms() >= e->expire_ms;
}

struct entry *store_get(const u8 *k, u64 klen) {
    rehash_step();
    int t;
    struct entry **link = find_link(k, klen, store_hash(k, klen), &t);
    if (!link)
        return NULL_PTR;
    if (unlikely(expired(*link))) {
        unlink_free(link, t);
        maybe_shrink();
        return NULL_PTR;
    }
    return *link;
}

/* Links the new entry `e` where `link` (found for its key in table `t`)
 * points, or as a new key when `link` is NULL. */
static void link_entry(struct entry *e, struct entry **link) {
    if (link) {
        struct entry *old = *link;
        e->next = old->next;
        *link = e;
        if (old->expire_ms)
            store_expires_count--;
        heap_free(old);
    } else {
        int t = rehash_idx >= 0 ? 1 : 0;
        struct entry **head = &ht[t].b[e->hash & ht[t].mask];
        e->next = *head;
        *head = e;
        ht[t].used++;
        if (rehash_idx < 0 && ht[0].used > ht[0].mask)
            resize_to((ht[0].mask + 1) * 2);
    }
    if (e->expire_ms)
        store_expires_count++;
}

void store_put(struct entry *e) {
    rehash_step();
    int t;
    link_entry(e, find_link(e->data, e->klen, e->hash, &t));
}

static inline int fits_in_place(struct entry *e, u64 vlen) {
    u64 need = sizeof(*e) + e->klen + vlen;
    u64 have = heap_usable(e);
    /* Without wasting much: INCR and same-size SETs rewrite in place. */
    return need <= have && have - need <= 64 + need / 2;
}

int store_upsert(const u8 *k, u64 klen, const u8 *v, u64 vlen, i64 expire_ms) {
    rehash_step();
    u64 h = store_hash(k, klen);
    int t;
    struct entry **link = find_link(k, klen, h, &t);
    if (link && fits_in_place(*link, vlen)) {
        struct entry *e = *link;
        mem_move(entry_val(e), v, vlen);
        e->vlen = (u32)vlen;
        store_set_expire(e, expire_ms);
        return 1;
    }
    if (klen > 0xFFFFFFFFULL || vlen > 0xFFFFFFFFULL)
        return 0;
    struct entry *e = heap_alloc(sizeof(*e) + klen + vlen);
    if (!e)
        return 0;
    e->hash = h;
    e->expire_ms = expire_ms;
    e->klen = (u32)klen;
    e->vlen = (u32)vlen;
    mem_copy(e->data, k, klen);
    mem_copy(e->data + klen, v, vlen);
    link_entry(e, link); /* allocating changed no table: `link` still holds */
    return 1;
}

void store_set_expire(struct entry *e, i64 expire_ms) {
    store_expires_count += (expire_ms != 0) - (e->expire_ms != 0);
    e->expire_ms = expire_ms;
}

struct entry *store_set_value(struct entry *e, const u8 *v, u64 vlen) {
    if (fits_in_place(e, vlen)) {
        mem_move(e->data + e->klen, v, vlen);
        e->vlen = (u32)vlen;
        return e;
    }
    struct entry *n = entry_new(e->data, e->klen, v, vlen);
    if (!n)
        return NULL_PTR;
    n->expire_ms = e->expire_ms;
    store_put(n); /* replaces and frees e */
    return n;
}

int store_del(const u8 *k, u64 klen) {
    rehash_step();
    int t;
    struct entry **link = find_link(k, klen, store_hash(k, klen), &t);
    if (!link)
        return 0;
    int live = !expired(*link);
    unlink_free(link, t);
    maybe_shrink();
    return live;
}

struct entry *entry_new(const u8 *k, u64 klen, const u8 *v, u64 vlen) {
    if (klen > 0xFFFFFFFFULL || vlen > 0xFFFFFFFFULL)
        return NULL_PTR;
    struct entry *e = heap_alloc(sizeof(*e) + klen + vlen);
    if (!e)
        return NULL_PTR;
    e->next = NULL_PTR;
    e->hash = store_hash(k, klen);
    e->expire_ms = 0;
    e->klen = (u32)klen;
    e->vlen = (u32)vlen;
    mem_copy(e->data, k, klen);
    if (vlen)
        mem_copy(e->data + klen, v, vlen);
    return e;
}

void entry_free(struct entry *e) { heap_free(e); }

void store_flush(void) {
    for (int t = 0; t < 2; t++) {
        if (!ht[t].b)
            continue;
        for (u64 i = 0; i <= ht[t].mask; i++) {
            struct entry *e = ht[t].b[i];
            while (e) {
                struct entry *next = e->next;
                heap_free(e);
                e = next;
            }
        }
        heap_free(ht[t].b);
    }
    /* The initial table is small and was just freed: this cannot fail. */
    store_init();
}

u64 store_sweep_expired(u64 max_buckets) {
    if (!store_expires_count)
        return 0;
    /* Entries move while the table resizes: finish that first (idle time
     * is the right time for it anyway), and sweep on a later call. */
    for (u64 n = 0; rehash_idx >= 0 && n < max_buckets; n += REHASH_STEP)
        rehash_step();
    if (rehash_idx >= 0)
        return 0;
    u64 removed = 0;
    i64 now = kv_now_ms();
    for (u64 n = 0; n < max_buckets; n++) {
        u64 i = sweep_cursor++ & ht[0].mask;
        struct entry **link = &ht[0].b[i];
        while (*link) {
            struct entry *e = *link;
            if (e->expire_ms && now >= e->expire_ms) {
                unlink_free(link, 0);
                removed++;
            } else {
                link = &e->next;
            }
        }
    }
    if (removed)
        maybe_shrink();
    return removed;
}

u64 store_count(void) { return ht[0].used + ht[1].used; }
u64 store_expires(void) { return store_expires_count; }
