/* The heap allocator: boundary tags, segregated free lists, immediate coalescing.
 *
 * Every byte the key-value store owns comes from here, so freeing all of it
 * (FLUSHALL, closing every connection) returns the heap to one free block and
 * `heap_used()` to its baseline. Deterministic: the same sequence of calls
 * gives the same addresses, which lockstep replicas rely on. */
#ifndef COLO_ALLOC_H
#define COLO_ALLOC_H

#include "util.h"

/* Takes over [base, base + size); `base` 16-aligned. Returns 0 if too small. */
int heap_init(void *base, u64 size);
void *heap_alloc(u64 n);
void heap_free(void *p);
/* Grows or shrinks keeping the first min(old, n) bytes; NULL (and `p`
 * untouched) when memory is short. */
void *heap_realloc(void *p, u64 n);
/* Bytes the block at `p` can hold (at least what was asked for). */
u64 heap_usable(const void *p);

u64 heap_used(void);  /* bytes in allocated blocks, headers included */
u64 heap_total(void); /* bytes under management */
u64 heap_blocks(void); /* allocated blocks */

#endif
