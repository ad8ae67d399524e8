/* Heap allocator (see alloc.h).
 *
 * Block layout: an 8-byte header `size | INUSE | PREV_INUSE` and, while the
 * block is free, list links after the header and a copy of the size in its
 * last 8 bytes (the footer), so `free` can find the previous block and merge
 * with it. Allocated blocks carry no footer: the PREV_INUSE bit of the next
 * block says the footer is not there. Sizes are multiples of 16 and payloads
 * 16-aligned. No two free blocks are ever adjacent.
 *
 * Free blocks sit in segregated lists: exact 16-byte classes below 1 KiB
 * (the common key/value sizes), four lists per power of two above. A bitmap
 * of non-empty lists finds the next list that can serve a request in a few
 * instructions. */
#include "alloc.h"

#define INUSE 1ULL
#define PREV_INUSE 2ULL
#define FLAGS 15ULL
#define HDR 8ULL
#define MIN_BLOCK 32ULL
#define SMALL_LIMIT 1024ULL
#define NBINS 192
#define BITMAP_WORDS (NBINS / 64)
/* Blocks examined in a list of mixed sizes before moving on to a larger list,
 * where every block fits: bounds the cost of one allocation. */
#define FIT_SCAN_LIMIT 16

struct free_block {
    u64 head;
    struct free_block *next;
    struct free_block *prev;
};

static struct free_block *bins[NBINS];
static u64 bitmap[BITMAP_WORDS];
static u8 *heap_lo, *heap_hi; /* first block header; sentinel header */
static u64 used_bytes, total_bytes, block_count;

static inline u64 bsize(const void *b) { return *(const u64 *)b & ~FLAGS; }
static inline u64 *hdr(void *b) { return (u64 *)b; }

static inline unsigned bin_of(u64 size) {
    if (size < SMALL_LIMIT)
        return (unsigned)(size >> 4);
    unsigned lg = 63u - (unsigned)__builtin_clzll(size); /* >= 10 */
    unsigned quarter = (unsigned)((size >> (lg - 2)) & 3);
    unsigned b = 64u + (lg - 10u) * 4u + quarter;
    return b < NBINS ? b : NBINS - 1;
}

static inline void bin_push(struct free_block *f) {
    unsigned b = bin_of(bsize(f));
    f->prev = NULL_PTR;
    f->next = bins[b];
    if (f->next)
        f->next->prev = f;
    bins[b] = f;
    bitmap[b >> 6] |= 1ULL << (b & 63);
}

static inline void bin_unlink(struct free_block *f) {
    unsigned b = bin_of(bsize(f));
    if (f->prev)
        f->prev->next = f->next;
    else
        bins[b] = f->next;
    if (f->next)
        f->next->prev = f->prev;
    if (!bins[b])
        bitmap[b >> 6] &= ~(1ULL << (b & 63));
}

/* Marks [b, b + size) free (keeping b's PREV_INUSE bit), writes its footer,
 * clears PREV_INUSE of the block after it and files it. */
static inline void make_free(u8 *b, u64 size) {
    *hdr(b) = size | (*hdr(b) & PREV_INUSE);
    *(u64 *)(b + size - HDR) = size;
    *hdr(b + size) &= ~PREV_INUSE;
    bin_push((struct free_block *)b);
}

int heap_init(void *base, u64 size) {
    u8 *lo = (u8 *)ALIGN_UP((u64)base, 16) + HDR; /* payloads 16-aligned */
    u8 *end = (u8 *)base + size;
    if (end < lo || (u64)(end - lo) < MIN_BLOCK + 2 * HDR)
        return 0;
    u64 span = ((u64)(end - lo) - HDR) & ~15ULL; /* room for the sentinel */
    mem_set(bins, 0, sizeof(bins));
    mem_set(bitmap, 0, sizeof(bitmap));
    heap_lo = lo;
    heap_hi = lo + span;
    *hdr(heap_hi) = INUSE; /* size 0: stops every walk to the right */
    *hdr(lo) = PREV_INUSE; /* nothing to merge with on the left */
    make_free(lo, span);
    used_bytes = 0;
    block_count = 0;
    total_bytes = span;
    return 1;
}

static inline u64 request_size(u64 n) {
    u64 need = ALIGN_UP(n + HDR, 16);
    return need < MIN_BLOCK ? MIN_BLOCK : need;
}

/* Turns the free block `b` (already unlinked) into an allocated one of
 * `need` bytes, returning the rest to the lists. */
static inline void *carve(u8 *b, u64 need) {
    u64 size = bsize(b);
    u64 flags = *hdr(b) & PREV_INUSE;
    if (size - need >= MIN_BLOCK) {
        u8 *rest = b + need;
        *hdr(rest) = PREV_INUSE;
        make_free(rest, size - need);
        size = need;
    } else {
        *hdr(b + size) |= PREV_INUSE;
    }
    *hdr(b) = size | flags | INUSE;
    used_bytes += size;
    block_count++;
    return b + HDR;
}

static u8 *find_block(u64 need) {
    unsigned b = bin_of(need);
    if (b >= 64 || bins[b]) {
        /* Exact classes: the head fits. Mixed lists: first fit, bounded. */
        int scanned = 0;
        for (struct free_block *f = bins[b]; f && scanned < FIT_SCAN_LIMIT; f = f->next, scanned++) {
            if (bsize(f) >= need)
                return (u8 *)f;
        }
    }
    /* Any block of a larger list fits. */
    for (unsigned w = (b + 1) >> 6; w < BITMAP_WORDS; w++) {
        u64 bits = bitmap[w];
        if (w == (b + 1) >> 6)
            bits &= ~0ULL << ((b + 1) & 63);
        if (bits)
            return (u8 *)bins[w * 64 + (unsigned)__builtin_ctzll(bits)];
    }
    return NULL_PTR;
}

void *heap_alloc(u64 n) {
    if (n > total_bytes)
        return NULL_PTR;
    u64 need = request_size(n);
    u8 *b = find_block(need);
    if (!b)
        return NULL_PTR;
    bin_unlink((struct free_block *)b);
    return carve(b, need);
}

static inline u8 *checked_block(const void *p) {
    u8 *b = (u8 *)p - HDR;
    if (unlikely(b < heap_lo || b >= heap_hi || !(*hdr(b) & INUSE) || bsize(b) < MIN_BLOCK ||
                 b + bsize(b) > heap_hi))
        fw_fatal(FATAL_HEAP_CORRUPT);
    return b;
}

void heap_free(void *p) {
    if (!p)
        return;
    u8 *b = checked_block(p);
    u64 size = bsize(b);
    used_bytes -= size;
    block_count--;
    u8 *next = b + size;
    if (!(*hdr(next) & INUSE)) {
        bin_unlink((struct free_block *)next);
        size += bsize(next);
    }
    if (!(*hdr(b) & PREV_INUSE)) {
        u64 psize = *(u64 *)(b - HDR);
        b -= psize;
        bin_unlink((struct free_block *)b);
        size += psize;
    }
    *hdr(b) = PREV_INUSE; /* the block before a free block is always in use */
    make_free(b, size);
}

void *heap_realloc(void *p, u64 n) {
    if (!p)
        return heap_alloc(n);
    if (n > total_bytes)
        return NULL_PTR;
    u8 *b = checked_block(p);
    u64 size = bsize(b);
    u64 need = request_size(n);
    if (need <= size) {
        if (size - need >= 4 * MIN_BLOCK) { /* give back a worthwhile tail */
            u8 *rest = b + need;
            *hdr(b) = need | (*hdr(b) & FLAGS);
            *hdr(rest) = (size - need) | INUSE | PREV_INUSE;
            block_count++; /* heap_free takes it off the books again */
            heap_free(rest + HDR);
        }
        return p;
    }
    u8 *next = b + size;
    if (!(*hdr(next) & INUSE) && size + bsize(next) >= need) {
        bin_unlink((struct free_block *)next);
        u64 merged = size + bsize(next);
        u64 flags = *hdr(b) & PREV_INUSE;
        used_bytes -= size;
        block_count--;
        *hdr(b) = merged | flags; /* momentarily a free block, unlisted */
        *hdr(b + merged) |= PREV_INUSE;
        return carve(b, need);
    }
    void *q = heap_alloc(n);
    if (!q)
        return NULL_PTR;
    mem_copy(q, p, size - HDR);
    heap_free(p);
    return q;
}

u64 heap_usable(const void *p) { return bsize((const u8 *)p - HDR) - HDR; }
u64 heap_used(void) { return used_bytes; }
u64 heap_total(void) { return total_bytes; }
u64 heap_blocks(void) { return block_count; }
