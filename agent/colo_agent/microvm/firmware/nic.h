/* The paravirtual NIC rings of docs/guest-abi.md, without port I/O.
 *
 * RX frames are handed to the key-value service where they lie; replies are
 * written straight into TX frames (one frame per run of output to the same
 * connection) and published in one go by nic_flush, which rings the doorbell
 * once. A full TX ring is published and the doorbell rung early: the monitor
 * drains the ring before the doorbell completes. */
#ifndef COLO_NIC_H
#define COLO_NIC_H

#include "util.h"

/* `rx`/`tx` point at a ring header; capacities are powers of two >= 8 KiB. */
void nic_init(void *rx, u32 rx_capacity, void *tx, u32 tx_capacity);
/* Handles every frame in RX as of now; returns how many. */
u64 nic_poll(void);
int nic_rx_pending(void);
/* Publishes written TX frames and rings the doorbell, if there are any. */
void nic_flush(void);
u64 nic_doorbells(void);
/* One batch: every frame in RX (including those arriving meanwhile), then
 * one flush. Returns the frames handled. */
u64 nic_service(void);

/* Provided by the platform: the guest writes the doorbell port. */
void plat_tx_doorbell(void);

#endif
