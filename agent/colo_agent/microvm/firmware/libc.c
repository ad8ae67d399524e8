/* The few libc functions gcc emits calls to, for the guest build only (the
 * host test driver uses the real libc). Whole words with `rep movsq`/`rep
 * stosq`, then the odd bytes: fast on hardware, and under emulation (unicorn,
 * or a nested hypervisor that steps the guest) each repetition costs about
 * one instruction, so moving 8 bytes per step is 8 times cheaper. */
#include "util.h"

void *memcpy(void *dst, const void *src, usize n) {
    void *d = dst;
    usize words = n >> 3, rest = n & 7;
    __asm__ __volatile__("rep movsq\n\tmov %3, %%rcx\n\trep movsb"
                         : "+D"(d), "+S"(src), "+c"(words)
                         : "r"(rest)
                         : "memory");
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
    usize words = n >> 3, rest = n & 7;
    u64 pattern = 0x0101010101010101ULL * (u8)c;
    __asm__ __volatile__("rep stosq\n\tmov %3, %%rcx\n\trep stosb"
                         : "+D"(d), "+c"(words)
                         : "a"(pattern), "r"(rest)
                         : "memory");
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
