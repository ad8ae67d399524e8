/* Small freestanding helpers shared by the key-value core and the platform layer.
 *
 * The core builds both for the guest (no libc) and for the host test driver
 * (with libc), so it only uses compiler builtins; the guest links its own
 * memcpy/memset/memmove/memcmp (libc.c) for the calls gcc emits for them. */
#ifndef COLO_UTIL_H
#define COLO_UTIL_H

typedef signed char i8;
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;
typedef int i32;
typedef unsigned long usize;

#define NULL_PTR ((void *)0)
#define INT64_MAX_V 0x7FFFFFFFFFFFFFFFLL
#define INT64_MIN_V (-INT64_MAX_V - 1)

#define likely(x) __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)
#define ALIGN_UP(x, a) (((x) + ((a)-1)) & ~((u64)(a)-1))
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

#define mem_copy(d, s, n) __builtin_memcpy((d), (s), (n))
#define mem_move(d, s, n) __builtin_memmove((d), (s), (n))
#define mem_set(d, c, n) __builtin_memset((d), (c), (n))
#define mem_cmp(a, b, n) __builtin_memcmp((a), (b), (n))

/* Keeps the compiler from caching or reordering memory accesses across it;
 * x86 stores are not reordered with other stores, so this is all a
 * single-producer single-consumer ring needs. */
#define compiler_barrier() __asm__ __volatile__("" ::: "memory")

/* Provided by the platform: an invariant broke (heap corruption, a bad ring).
 * The guest reports it on the PANIC port and stops; the host driver aborts. */
void fw_fatal(u32 code) __attribute__((noreturn));

#define FATAL_BAD_BOOT_INFO 1
#define FATAL_HEAP_CORRUPT 2
#define FATAL_RX_RING_CORRUPT 3
#define FATAL_TX_RING_STUCK 4

static inline u8 ascii_upper(u8 c) { return (c >= 'a' && c <= 'z') ? (u8)(c - 32) : c; }

/* Case-insensitive comparison of `n` bytes against an upper-case literal. */
static inline int eq_nocase(const u8 *p, usize n, const char *upper) {
    usize i = 0;
    for (; i < n; i++) {
        if (upper[i] == 0 || ascii_upper(p[i]) != (u8)upper[i])
            return 0;
    }
    return upper[i] == 0;
}

/* Decimal text of `v` into `out` (at least 20 bytes); returns the length. */
static inline usize fmt_u64(u64 v, u8 *out) {
    u8 tmp[20];
    usize n = 0;
    do {
        tmp[n++] = (u8)('0' + v % 10);
        v /= 10;
    } while (v);
    for (usize i = 0; i < n; i++)
        out[i] = tmp[n - 1 - i];
    return n;
}

/* Decimal text of `v` into `out` (at least 21 bytes); returns the length. */
static inline usize fmt_i64(i64 v, u8 *out) {
    if (v < 0) {
        out[0] = '-';
        return 1 + fmt_u64((u64)0 - (u64)v, out + 1);
    }
    return fmt_u64((u64)v, out);
}

/* Strict signed decimal, as Redis accepts it: optional '-', no leading '+',
 * no spaces, no leading zeros, within int64. Returns 1 on success. */
static inline int parse_i64(const u8 *p, usize n, i64 *out) {
    if (n == 0 || n > 20)
        return 0;
    int neg = 0;
    usize i = 0;
    if (p[0] == '-') {
        neg = 1;
        i = 1;
        if (n == 1)
            return 0;
    }
    if (p[i] == '0' && n > i + 1)
        return 0;
    u64 v = 0;
    for (; i < n; i++) {
        if (p[i] < '0' || p[i] > '9')
            return 0;
        u64 d = (u64)(p[i] - '0');
        if (v > (0xFFFFFFFFFFFFFFFFULL - d) / 10)
            return 0;
        v = v * 10 + d;
    }
    if (neg) {
        if (v > (u64)INT64_MAX_V + 1)
            return 0;
        *out = (i64)((u64)0 - v);
    } else {
        if (v > (u64)INT64_MAX_V)
            return 0;
        *out = (i64)v;
    }
    return 1;
}

#endif
