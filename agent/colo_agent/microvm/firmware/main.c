/* The guest platform: boot_info, the ports, the service loop and the
 * optional steady page-dirtying load. Everything else is port-free and also
 * runs on the host under the test driver. */
#include "abi.h"
#include "kv.h"
#include "nic.h"
#include "store.h"
#include "util.h"

struct boot_info {
    u64 magic;
    u64 ram_size;
    u64 heap_start;
    u64 rx_ring;
    u64 rx_capacity;
    u64 tx_ring;
    u64 tx_capacity;
    u64 dirty_rate;
};

extern u8 _end[];
void libc_init(void);

#define MAX_GUEST_RAM (1ULL << 30) /* the identity map covers the first GiB */
#define MIN_HEAP (1ULL << 20)
/* While dirtying pages, the guest wakes this often (µs) to keep the rate
 * smooth rather than bursty. */
#define DIRTY_WAKE_US 10000u
#define DIRTY_SCRATCH_MAX (256ULL << 20)

static inline void outb(u16 port, u8 v) { __asm__ __volatile__("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ __volatile__("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u32 inl(u16 port) {
    u32 v;
    __asm__ __volatile__("inl %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

u64 plat_now_ns(void) {
    u64 lo = inl(PORT_CLOCK_LO); /* latches the clock */
    u64 hi = inl(PORT_CLOCK_HI);
    return hi << 32 | lo;
}

void plat_tx_doorbell(void) { outl(PORT_TX_DOORBELL, 1); }

void fw_fatal(u32 code) {
    outl(PORT_PANIC, code);
    for (;;)
        __asm__ __volatile__("cli; hlt");
}

static void log_str(const char *s) {
    while (*s)
        outb(PORT_CONSOLE, (u8)*s++);
}

static void log_u64(u64 v) {
    u8 digits[20];
    usize n = fmt_u64(v, digits);
    for (usize i = 0; i < n; i++)
        outb(PORT_CONSOLE, digits[i]);
}

static int ring_ok(u64 addr, u64 expected, u64 cap) {
    return addr == expected && cap >= 2 * (MAX_FRAME_PAYLOAD + FRAME_HEADER_SIZE) && !(cap & (cap - 1)) &&
           addr + RING_DATA_OFFSET + cap <= FIRMWARE_ADDR;
}

/* --- steady dirtying load (boot_info.dirty_rate) ------------------------- */

static u8 *scratch;
static u64 scratch_pages, scratch_next;
static u64 dirty_rate, dirty_last_ns, dirty_carry;

static void dirty_tick(void) {
    u64 now = plat_now_ns();
    u64 elapsed = now - dirty_last_ns;
    dirty_last_ns = now;
    /* After a stall (a pause, a starved vCPU) catch up at most 100 ms: a
     * burst of owed pages would land in one checkpoint and could overflow
     * the secondary's cache, which a steady rate never does. */
    if (elapsed > 100000000ULL)
        elapsed = 100000000ULL;
    /* rate <= 2^32 and elapsed <= 1e8 keep this within 64 bits. */
    u64 owed = dirty_carry + dirty_rate * elapsed;
    u64 pages = owed / 1000000000ULL;
    dirty_carry = owed % 1000000000ULL;
    if (pages > scratch_pages)
        pages = scratch_pages;
    while (pages--) {
        volatile u64 *word = (volatile u64 *)(scratch + scratch_next * PAGE_SIZE);
        *word = *word + 1; /* a real change, so content comparison sees it too */
        if (++scratch_next == scratch_pages)
            scratch_next = 0;
    }
}

void firmware_main(void) {
    libc_init();
    const struct boot_info *bi = (const struct boot_info *)BOOT_INFO_ADDR;
    if (bi->magic != BOOT_MAGIC || bi->ram_size > MAX_GUEST_RAM || bi->heap_start & (PAGE_SIZE - 1) ||
        bi->heap_start < (u64)_end || bi->heap_start + MIN_HEAP > bi->ram_size ||
        !ring_ok(bi->rx_ring, RX_RING_ADDR, bi->rx_capacity) ||
        !ring_ok(bi->tx_ring, TX_RING_ADDR, bi->tx_capacity))
        fw_fatal(FATAL_BAD_BOOT_INFO);

    u8 *heap = (u8 *)bi->heap_start;
    u64 heap_size = bi->ram_size - bi->heap_start;
    dirty_rate = bi->dirty_rate > 0xFFFFFFFFULL ? 0xFFFFFFFFULL : bi->dirty_rate;
    if (dirty_rate) {
        /* Three quarters of the heap (a 64 MiB guest can then dirty 10,000
         * distinct pages between checkpoints), taken before the store sees it. */
        u64 bytes = MIN(heap_size / 4 * 3, DIRTY_SCRATCH_MAX) & ~(u64)(PAGE_SIZE - 1);
        scratch = heap;
        scratch_pages = bytes / PAGE_SIZE;
        heap += bytes;
        heap_size -= bytes;
        if (!scratch_pages)
            dirty_rate = 0;
    }
    if (!kv_init(heap, heap_size))
        fw_fatal(FATAL_BAD_BOOT_INFO);
    nic_init((void *)bi->rx_ring, (u32)bi->rx_capacity, (void *)bi->tx_ring, (u32)bi->tx_capacity);

    log_str("colo-kv " KV_VERSION ": ram ");
    log_u64(bi->ram_size >> 20);
    log_str(" MiB, heap ");
    log_u64(heap_size >> 10);
    log_str(" KiB");
    if (dirty_rate) {
        log_str(", dirtying ");
        log_u64(dirty_rate);
        log_str(" pages/s over ");
        log_u64(scratch_pages);
        log_str(" pages");
    }
    log_str(", ready\n");

    dirty_last_ns = dirty_rate ? plat_now_ns() : 0;
    const volatile u32 *rx_head = (const volatile u32 *)(bi->rx_ring + RING_HEAD_OFFSET);
    const volatile u32 *rx_tail = (const volatile u32 *)(bi->rx_ring + RING_TAIL_OFFSET);
    for (;;) {
        /* Checked inline, without a call: a wake-up with nothing to do (the
         * monitor ends waits early, e.g. to pause us) must not write even a
         * return address, so an idle guest leaves every page clean. */
        if (*rx_head != *rx_tail)
            nic_service(); /* publishes replies and rings the doorbell */
        if (dirty_rate)
            dirty_tick();
        if (*rx_head == *rx_tail) {
            /* Keys with an expiry need a periodic sweep (store_expires_count
             * is read directly for the same reason as the ring indices). */
            u32 wait_us = WAIT_FOREVER;
            if (store_expires_count) {
                kv_idle();
                wait_us = KV_IDLE_INTERVAL_US;
            }
            if (dirty_rate)
                wait_us = MIN(wait_us, DIRTY_WAKE_US);
            if (*rx_head == *rx_tail)
                outl(PORT_WAIT, wait_us);
        }
    }
}
