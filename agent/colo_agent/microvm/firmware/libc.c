/* The few libc functions gcc emits calls to, for the guest build only (the
 * host test driver uses the real libc). `rep movsb`/`rep stosb` are fast on
 * CPUs with ERMS and are a single emulated instruction per byte run under
 * software emulation. */
#include "util.h"

void *memcpy(void *dst, const void *src, usize n) {
    void *d = dst;
    __asm__ __volatile__("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
    return dst;
}

void *memmove(void *dst, const void *src, usize n) {
    if ((const u8 *)dst <= (const u8 *)src || (const u8 *)dst >= (const u8 *)src + n)
        return memcpy(dst, src, n);
    /* Overlapping with dst above src: copy backwards. */
    void *d = (u8 *)dst + n - 1;
    const void *s = (const u8 *)src + n - 1;
    __asm__ __volatile__("std\n\trep movsb\n\tcld" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
    return dst;
}

void *memset(void *dst, int c, usize n) {
    void *d = dst;
    __asm__ __volatile__("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return dst;
}

int memcmp(const void *a, const void *b, usize n) {
    const u8 *x = a, *y = b;
    while (n >= 8) {
        u64 p, q;
        __builtin_memcpy(&p, x, 8);
        __builtin_memcpy(&q, y, 8);
        if (p != q)
            break;
        x += 8;
        y += 8;
        n -= 8;
    }
    for (; n; n--, x++, y++) {
        if (*x != *y)
            return *x < *y ? -1 : 1;
    }
    return 0;
}
