/* The few libc functions gcc emits calls to, for the guest build only (the
 * host test driver uses the real libc).
 *
 * What is fast depends on who runs the guest. Under unicorn every
 * repetition of a `rep movs`/`rep stos` costs about as much as a whole
 * translated block (microseconds), while plain loads and stores in a loop
 * are cheap. Under KVM a `rep movsq` is fast on hardware, and on the nested
 * KVM of our development machines, which steps the guest at roughly a
 * microsecond per instruction, it moves 8 bytes per step where a loop needs
 * several instructions. So: word loops always for small sizes, and `rep`
 * for large ones only when CPUID says KVM runs us (libc_init). */
#include "util.h"

int libc_prefer_rep; /* non-static so the host test can try both paths */

#define REP_THRESHOLD 256

void libc_init(void) {
    u32 eax = 0x40000000, ebx, ecx = 0, edx;
    __asm__ __volatile__("cpuid" : "+a"(eax), "=b"(ebx), "+c"(ecx), "=d"(edx));
    /* "KVMKVMKVM\0\0\0" in ebx, ecx, edx */
    libc_prefer_rep = ebx == 0x4B4D564B && ecx == 0x564B4D56 && edx == 0x0000004D;
}

static inline u64 load64(const u8 *p) {
    u64 v;
    __builtin_memcpy(&v, p, 8);
    return v;
}

static inline void store64(u8 *p, u64 v) { __builtin_memcpy(p, &v, 8); }

/* n <= 16, buffers not overlapping: two possibly overlapping moves. */
static inline void copy_small(u8 *d, const u8 *s, usize n) {
    if (n >= 8) {
        u64 a = load64(s), b = load64(s + n - 8);
        store64(d, a);
        store64(d + n - 8, b);
    } else if (n >= 4) {
        u32 a, b;
        __builtin_memcpy(&a, s, 4);
        __builtin_memcpy(&b, s + n - 4, 4);
        __builtin_memcpy(d, &a, 4);
        __builtin_memcpy(d + n - 4, &b, 4);
    } else if (n) {
        d[0] = s[0];
        d[n / 2] = s[n / 2];
        d[n - 1] = s[n - 1];
    }
}

static inline void rep_movs(u8 *d, const u8 *s, usize n) {
    usize words = n >> 3, rest = n & 7;
    __asm__ __volatile__("rep movsq\n\tmov %3, %%rcx\n\trep movsb"
                         : "+D"(d), "+S"(s), "+c"(words)
                         : "r"(rest)
                         : "memory");
}

void *memcpy(void *dst, const void *src, usize n) {
    u8 *d = dst;
    const u8 *s = src;
    if (n <= 16) {
        copy_small(d, s, n);
        return dst;
    }
    if (libc_prefer_rep && n >= REP_THRESHOLD) {
        rep_movs(d, s, n);
        return dst;
    }
    /* 16 bytes a step, then the last 16 bytes (overlapping what was copied). */
    u8 *last_d = d + n - 16;
    const u8 *last_s = s + n - 16;
    while (s < last_s) {
        u64 a = load64(s), b = load64(s + 8);
        store64(d, a);
        store64(d + 8, b);
        s += 16;
        d += 16;
    }
    u64 a = load64(last_s), b = load64(last_s + 8);
    store64(last_d, a);
    store64(last_d + 8, b);
    return dst;
}

void *memmove(void *dst, const void *src, usize n) {
    u8 *d = dst;
    const u8 *s = src;
    if (d + n <= s || s + n <= d)
        return memcpy(dst, src, n);
    if (d < s) { /* forward; every word is read before it is overwritten */
        for (; n >= 8; n -= 8, d += 8, s += 8)
            store64(d, load64(s));
        for (; n; n--)
            *d++ = *s++;
    } else if (d > s) { /* backward */
        d += n;
        s += n;
        for (; n >= 8; n -= 8) {
            d -= 8;
            s -= 8;
            store64(d, load64(s));
        }
        while (n--)
            *--d = *--s;
    }
    return dst;
}

void *memset(void *dst, int c, usize n) {
    u8 *d = dst;
    u64 pattern = 0x0101010101010101ULL * (u8)c;
    if (n < 8) {
        for (usize i = 0; i < n; i++)
            d[i] = (u8)c;
        return dst;
    }
    if (libc_prefer_rep && n >= REP_THRESHOLD) {
        usize words = n >> 3, rest = n & 7;
        __asm__ __volatile__("rep stosq\n\tmov %3, %%rcx\n\trep stosb"
                             : "+D"(d), "+c"(words)
                             : "a"(pattern), "r"(rest)
                             : "memory");
        return dst;
    }
    u8 *last = d + n - 8;
    for (; d < last; d += 8)
        store64(d, pattern);
    store64(last, pattern);
    return dst;
}

int memcmp(const void *a, const void *b, usize n) {
    const u8 *x = a, *y = b;
    for (; n >= 8; n -= 8, x += 8, y += 8) {
        if (load64(x) != load64(y))
            break;
    }
    for (; n; n--, x++, y++) {
        if (*x != *y)
            return *x < *y ? -1 : 1;
    }
    return 0;
}
