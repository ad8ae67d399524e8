/* Checks the guest's memcpy/memmove/memset/memcmp (libc.c, built with its
 * symbols renamed) against the host libc, for every size up to a few
 * hundred bytes, every alignment and overlap, on both of its code paths.
 * Prints "ok" and exits 0, or says what differs and exits 1. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void *fw_memcpy(void *, const void *, size_t);
void *fw_memmove(void *, const void *, size_t);
void *fw_memset(void *, int, size_t);
int fw_memcmp(const void *, const void *, size_t);
extern int libc_prefer_rep;

#define N 700
static unsigned char a[N + 64], b[N + 64], ref[N + 64];

static void fill(unsigned char *p, size_t n, unsigned seed) {
    for (size_t i = 0; i < n; i++)
        p[i] = (unsigned char)(seed * 131 + i * 7 + (i >> 3));
}

static int sign(int v) { return (v > 0) - (v < 0); }

int main(void) {
    for (int rep = 0; rep < 2; rep++) {
        libc_prefer_rep = rep;
        for (size_t n = 0; n <= 600; n += (n < 70 ? 1 : 13)) {
            for (size_t da = 0; da < 8; da++) {
                for (size_t sa = 0; sa < 8; sa++) {
                    fill(a, sizeof(a), (unsigned)(n + sa));
                    memset(b, 0xEE, sizeof(b));
                    memset(ref, 0xEE, sizeof(ref));
                    memcpy(ref + da, a + sa, n);
                    if (fw_memcpy(b + da, a + sa, n) != b + da || memcmp(b, ref, sizeof(b))) {
                        printf("memcpy n=%zu da=%zu sa=%zu rep=%d\n", n, da, sa, rep);
                        return 1;
                    }
                    memset(ref, 0x5A, sizeof(ref));
                    memset(ref + da, (int)(n & 0xFF), n);
                    memset(b, 0x5A, sizeof(b));
                    fw_memset(b + da, (int)(n & 0xFF), n);
                    if (memcmp(b, ref, sizeof(b))) {
                        printf("memset n=%zu da=%zu rep=%d\n", n, da, rep);
                        return 1;
                    }
                    fill(a, sizeof(a), 3);
                    memcpy(b, a, sizeof(a));
                    if (n && sa < 4)
                        b[da + n - 1 - (sa % n)] ^= 0x80;
                    if (sign(fw_memcmp(a + da, b + da, n)) != sign(memcmp(a + da, b + da, n))) {
                        printf("memcmp n=%zu da=%zu sa=%zu\n", n, da, sa);
                        return 1;
                    }
                }
            }
            /* Overlapping moves in both directions, by every shift up to 40. */
            for (size_t shift = 0; shift <= 40; shift++) {
                for (int dir = 0; dir < 2; dir++) {
                    size_t d = dir ? shift : 0, s = dir ? 0 : shift;
                    fill(a, sizeof(a), (unsigned)n);
                    memcpy(ref, a, sizeof(a));
                    memmove(ref + d, ref + s, n);
                    fw_memmove(a + d, a + s, n);
                    if (memcmp(a, ref, sizeof(a))) {
                        printf("memmove n=%zu dst=%zu src=%zu\n", n, d, s);
                        return 1;
                    }
                }
            }
        }
    }
    puts("ok");
    return 0;
}
