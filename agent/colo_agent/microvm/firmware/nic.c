/* NIC rings (see nic.h and docs/guest-abi.md). */
#include "nic.h"

#include "abi.h"
#include "kv.h"

struct frame_header {
    u32 conn;
    u16 type;
    u16 len;
};

struct ring {
    volatile u32 *head;
    volatile u32 *tail;
    u8 *data;
    u32 cap;
    u32 mask;
};

static struct ring rx, tx;
static u32 rx_tail;    /* our copy of RX tail */
static u32 tx_head;    /* end of the closed TX frames, published or not */
static u32 tx_published;
static u64 doorbells;

/* The TX frame being filled: output to one connection is appended to it
 * until it is full or another connection speaks. */
static int frame_open;
static u32 frame_at; /* == tx_head while open */
static u32 frame_conn;
static u32 frame_len;
static u32 frame_room;

/* Frames smaller than this are not worth starting before a wrap or a drain. */
#define MIN_FRAME_ROOM 256u
/* Doorbells in a row that freed no space before the ring counts as stuck. */
#define STUCK_DOORBELLS 1000

static void ring_setup(struct ring *r, void *base, u32 cap) {
    r->head = (volatile u32 *)((u8 *)base + RING_HEAD_OFFSET);
    r->tail = (volatile u32 *)((u8 *)base + RING_TAIL_OFFSET);
    r->data = (u8 *)base + RING_DATA_OFFSET;
    r->cap = cap;
    r->mask = cap - 1;
}

void nic_init(void *rx_base, u32 rx_capacity, void *tx_base, u32 tx_capacity) {
    ring_setup(&rx, rx_base, rx_capacity);
    ring_setup(&tx, tx_base, tx_capacity);
    /* Continue where the rings stand (they are zero at first boot). */
    rx_tail = *rx.tail;
    tx_head = tx_published = *tx.head;
    frame_open = 0;
    doorbells = 0;
}

/* --- RX ------------------------------------------------------------------ */

int nic_rx_pending(void) { return *rx.head != rx_tail; }

u64 nic_poll(void) {
    u32 head = *rx.head;
    compiler_barrier(); /* frame bytes are read after head */
    u64 frames = 0;
    if (unlikely((u32)(head - rx_tail) > rx.cap || (head & 7)))
        fw_fatal(FATAL_RX_RING_CORRUPT);
    while (rx_tail != head) {
        u32 off = rx_tail & rx.mask;
        u32 used = head - rx_tail;
        struct frame_header h;
        mem_copy(&h, rx.data + off, sizeof(h));
        u32 size;
        if (h.type == FRAME_PAD) {
            size = rx.cap - off;
        } else {
            size = FRAME_HEADER_SIZE + (u32)ALIGN_UP(h.len, FRAME_ALIGN);
            if (unlikely(h.len > MAX_FRAME_PAYLOAD || off + size > rx.cap))
                fw_fatal(FATAL_RX_RING_CORRUPT);
        }
        if (unlikely(size > used))
            fw_fatal(FATAL_RX_RING_CORRUPT);
        const u8 *payload = rx.data + off + FRAME_HEADER_SIZE;
        switch (h.type) {
        case FRAME_OPEN:
            kv_open(h.conn);
            break;
        case FRAME_DATA:
            kv_data(h.conn, payload, h.len);
            break;
        case FRAME_CLOSE:
            kv_close(h.conn);
            break;
        default: /* PAD, or a type from a newer monitor: skipped */
            break;
        }
        rx_tail += size;
        compiler_barrier(); /* done with the frame before giving it back */
        *rx.tail = rx_tail;
        frames++;
    }
    return frames;
}

/* --- TX ------------------------------------------------------------------ */

static void publish(void) {
    if (tx_head == tx_published)
        return;
    compiler_barrier(); /* frames are written before head moves */
    *tx.head = tx_head;
    tx_published = tx_head;
    doorbells++;
    plat_tx_doorbell();
}

static void close_frame(void) {
    if (!frame_open)
        return;
    struct frame_header h = {frame_conn, FRAME_DATA, (u16)frame_len};
    mem_copy(tx.data + (frame_at & tx.mask), &h, sizeof(h));
    tx_head = frame_at + FRAME_HEADER_SIZE + (u32)ALIGN_UP(frame_len, FRAME_ALIGN);
    frame_open = 0;
}

/* Makes room for a frame at tx_head: returns the payload bytes it may hold
 * (at least min(want, MIN_FRAME_ROOM)), padding to the start of the data
 * area or draining the ring through the doorbell as needed. */
static u32 reserve(u32 want) {
    u32 target = MIN(want, MIN_FRAME_ROOM);
    int stuck = 0;
    for (;;) {
        u32 free_bytes = tx.cap - (tx_head - *tx.tail);
        u32 off = tx_head & tx.mask;
        u32 contiguous = tx.cap - off;
        if (contiguous - FRAME_HEADER_SIZE < target && off != 0) {
            if (free_bytes >= contiguous) { /* wrap with a PAD frame */
                struct frame_header pad = {0, FRAME_PAD, 0};
                mem_copy(tx.data + off, &pad, sizeof(pad));
                tx_head += contiguous;
                continue;
            }
        } else if (free_bytes >= FRAME_HEADER_SIZE + target) {
            return MIN(MAX_FRAME_PAYLOAD, MIN(contiguous, free_bytes) - FRAME_HEADER_SIZE);
        }
        /* Full: publish what we have and ring; the monitor drains the ring
         * before the doorbell completes. */
        u32 before = *tx.tail;
        if (tx_head != tx_published) {
            compiler_barrier();
            *tx.head = tx_head;
            tx_published = tx_head;
        }
        doorbells++;
        plat_tx_doorbell();
        if (*tx.tail == before && ++stuck >= STUCK_DOORBELLS)
            fw_fatal(FATAL_TX_RING_STUCK);
    }
}

void out_data(u32 conn, const void *p, u64 n) {
    const u8 *src = p;
    while (n) {
        if (!frame_open || frame_conn != conn || frame_len == frame_room) {
            close_frame();
            frame_room = reserve((u32)MIN(n, MAX_FRAME_PAYLOAD));
            frame_open = 1;
            frame_at = tx_head;
            frame_conn = conn;
            frame_len = 0;
        }
        u32 k = (u32)MIN(n, (u64)(frame_room - frame_len));
        mem_copy(tx.data + (frame_at & tx.mask) + FRAME_HEADER_SIZE + frame_len, src, k);
        frame_len += k;
        src += k;
        n -= k;
    }
}

void out_close(u32 conn) {
    close_frame();
    reserve(0);
    struct frame_header h = {conn, FRAME_CLOSE, 0};
    mem_copy(tx.data + (tx_head & tx.mask), &h, sizeof(h));
    tx_head += FRAME_HEADER_SIZE;
}

void nic_flush(void) {
    close_frame();
    publish();
}

u64 nic_doorbells(void) { return doorbells; }

u64 nic_service(void) {
    kv_batch_begin();
    u64 total = 0, n;
    while ((n = nic_poll()) != 0)
        total += n;
    nic_flush();
    return total;
}
