/* Runs the firmware's key-value core and NIC ring code on the host, playing
 * the monitor's part over in-memory rings, so tests can drive the service
 * without a virtual machine.
 *
 * usage: host_test_driver HEAP_BYTES [RING_CAPACITY]
 *
 * stdin and stdout carry records `u8 op, u32 conn, u32 len, len bytes`
 * (little-endian). Input ops:
 *   'O' open conn        'D' data for conn        'C' close conn
 *   'T' set the clock (payload: u64 ns)
 *   'R' run the guest until RX is empty (one batch per ring-full)
 *   'S' run, then report statistics
 *   'I' run, then one idle-time pass of the service (active expiry)
 * Frames stay in RX until 'R', 'S', the end of input or a full ring, so a
 * test decides what one batch holds. Output ops: 'D' reply bytes, 'C' the
 * service closed conn, 'S' statistics as "name=value" words. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "abi.h"
#include "kv.h"
#include "nic.h"

static uint8_t *rx_ring, *tx_ring;
static uint32_t ring_cap;
static uint64_t clock_ns;
static uint64_t heap_bytes;

static volatile uint32_t *field(uint8_t *ring, unsigned off) { return (volatile uint32_t *)(ring + off); }

u64 plat_now_ns(void) { return clock_ns; }

void fw_fatal(u32 code) {
    fprintf(stderr, "host_test_driver: fatal firmware error %u\n", code);
    exit(3);
}

static void emit(uint8_t op, uint32_t conn, const void *p, uint32_t len) {
    fputc(op, stdout);
    fwrite(&conn, 4, 1, stdout);
    fwrite(&len, 4, 1, stdout);
    if (len)
        fwrite(p, 1, len, stdout);
}

/* The monitor's side of TX: drain everything, as the ABI requires. */
void plat_tx_doorbell(void) {
    uint32_t head = *field(tx_ring, RING_HEAD_OFFSET);
    uint32_t tail = *field(tx_ring, RING_TAIL_OFFSET);
    uint8_t *data = tx_ring + RING_DATA_OFFSET;
    if ((uint32_t)(head - tail) > ring_cap || (head & 7)) {
        fprintf(stderr, "host_test_driver: bad TX head %u tail %u\n", head, tail);
        exit(4);
    }
    while (tail != head) {
        uint32_t off = tail & (ring_cap - 1);
        uint32_t conn;
        uint16_t type, len;
        memcpy(&conn, data + off, 4);
        memcpy(&type, data + off + 4, 2);
        memcpy(&len, data + off + 6, 2);
        if (type == FRAME_PAD) {
            tail += ring_cap - off;
            continue;
        }
        uint32_t size = FRAME_HEADER_SIZE + ((len + 7u) & ~7u);
        if (len > MAX_FRAME_PAYLOAD || off + size > ring_cap || size > (uint32_t)(head - tail)) {
            fprintf(stderr, "host_test_driver: bad TX frame at %u (type %u len %u)\n", off, type, len);
            exit(4);
        }
        if (type == FRAME_DATA)
            emit('D', conn, data + off + FRAME_HEADER_SIZE, len);
        else if (type == FRAME_CLOSE)
            emit('C', conn, NULL, 0);
        tail += size;
    }
    *field(tx_ring, RING_TAIL_OFFSET) = tail;
}

static void run_guest(void) {
    while (*field(rx_ring, RING_HEAD_OFFSET) != *field(rx_ring, RING_TAIL_OFFSET))
        nic_service();
}

/* The monitor's side of RX: one frame, padding to the start when it does
 * not fit before the end, running the guest when the ring is full. */
static void rx_frame(uint32_t conn, uint16_t type, const uint8_t *p, uint16_t len) {
    uint32_t size = FRAME_HEADER_SIZE + ((len + 7u) & ~7u);
    uint8_t *data = rx_ring + RING_DATA_OFFSET;
    for (;;) {
        uint32_t head = *field(rx_ring, RING_HEAD_OFFSET);
        uint32_t used = head - *field(rx_ring, RING_TAIL_OFFSET);
        uint32_t off = head & (ring_cap - 1);
        uint32_t contiguous = ring_cap - off;
        if (contiguous < size) {
            if (ring_cap - used < contiguous) {
                run_guest();
                continue;
            }
            uint8_t pad[8] = {0};
            memcpy(data + off, pad, 8);
            *field(rx_ring, RING_HEAD_OFFSET) = head + contiguous;
            continue;
        }
        if (ring_cap - used < size) {
            run_guest();
            continue;
        }
        memcpy(data + off, &conn, 4);
        memcpy(data + off + 4, &type, 2);
        memcpy(data + off + 6, &len, 2);
        if (len)
            memcpy(data + off + FRAME_HEADER_SIZE, p, len);
        *field(rx_ring, RING_HEAD_OFFSET) = head + size;
        return;
    }
}

static void report_stats(void) {
    struct kv_stats s;
    kv_get_stats(&s);
    char text[512];
    int n = snprintf(text, sizeof(text),
                     "keys=%llu expires=%llu used_memory=%llu heap_size=%llu heap_blocks=%llu "
                     "connections=%llu commands=%llu doorbells=%llu",
                     (unsigned long long)s.keys, (unsigned long long)s.expires,
                     (unsigned long long)s.used_memory, (unsigned long long)s.heap_size,
                     (unsigned long long)s.heap_blocks, (unsigned long long)s.connections,
                     (unsigned long long)s.commands, (unsigned long long)nic_doorbells());
    emit('S', 0, text, (uint32_t)n);
}

static int read_exact(void *p, size_t n) { return fread(p, 1, n, stdin) == n; }

int main(int argc, char **argv) {
    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: %s HEAP_BYTES [RING_CAPACITY]\n", argv[0]);
        return 2;
    }
    heap_bytes = strtoull(argv[1], NULL, 0);
    ring_cap = argc == 3 ? (uint32_t)strtoul(argv[2], NULL, 0) : RING_CAPACITY;
    if (ring_cap < 2 * (MAX_FRAME_PAYLOAD + FRAME_HEADER_SIZE) || (ring_cap & (ring_cap - 1))) {
        fprintf(stderr, "RING_CAPACITY must be a power of two of at least 16 KiB\n");
        return 2;
    }
    rx_ring = aligned_alloc(4096, RING_DATA_OFFSET + ring_cap);
    tx_ring = aligned_alloc(4096, RING_DATA_OFFSET + ring_cap);
    void *heap = aligned_alloc(4096, (heap_bytes + 4095) & ~4095ULL);
    if (!rx_ring || !tx_ring || !heap) {
        fprintf(stderr, "out of host memory\n");
        return 2;
    }
    memset(rx_ring, 0, RING_DATA_OFFSET + ring_cap);
    memset(tx_ring, 0, RING_DATA_OFFSET + ring_cap);
    /* Garbage, not zeroes: the service must not rely on a zeroed heap. */
    memset(heap, 0xA5, heap_bytes);
    if (!kv_init(heap, heap_bytes)) {
        fprintf(stderr, "heap too small\n");
        return 2;
    }
    nic_init(rx_ring, ring_cap, tx_ring, ring_cap);

    static uint8_t payload[1 << 20];
    for (;;) {
        uint8_t op;
        uint32_t conn, len;
        if (!read_exact(&op, 1))
            break;
        if (!read_exact(&conn, 4) || !read_exact(&len, 4) || len > sizeof(payload) || !read_exact(payload, len)) {
            fprintf(stderr, "truncated input record\n");
            return 2;
        }
        switch (op) {
        case 'O':
            rx_frame(conn, FRAME_OPEN, NULL, 0);
            break;
        case 'C':
            rx_frame(conn, FRAME_CLOSE, NULL, 0);
            break;
        case 'D':
            for (uint32_t off = 0; off < len; off += MAX_FRAME_PAYLOAD) {
                uint32_t n = len - off < MAX_FRAME_PAYLOAD ? len - off : MAX_FRAME_PAYLOAD;
                rx_frame(conn, FRAME_DATA, payload + off, (uint16_t)n);
            }
            break;
        case 'T':
            if (len != 8) {
                fprintf(stderr, "'T' needs an 8-byte payload\n");
                return 2;
            }
            run_guest(); /* frames before the clock change see the old time */
            memcpy(&clock_ns, payload, 8);
            break;
        case 'R':
            run_guest();
            break;
        case 'S':
            run_guest();
            report_stats();
            break;
        case 'I':
            run_guest();
            kv_idle();
            break;
        default:
            fprintf(stderr, "unknown op %#x\n", op);
            return 2;
        }
    }
    run_guest();
    fflush(stdout);
    return 0;
}
