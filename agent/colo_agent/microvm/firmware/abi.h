/* Constants of the guest ABI (docs/guest-abi.md); mirrored in colo_agent/microvm/abi.py. */
#ifndef COLO_ABI_H
#define COLO_ABI_H

#define PAGE_SIZE 4096

#define GDT_ADDR 0x500
#define PML4_ADDR 0x1000
#define PDPT_ADDR 0x2000
#define PD_ADDR 0x3000
#define BOOT_INFO_ADDR 0x4000
#define STACK_TOP 0x80000
#define RX_RING_ADDR 0x80000
#define TX_RING_ADDR 0xC0000
#define RING_CAPACITY 0x20000
#define RING_HEAD_OFFSET 0
#define RING_TAIL_OFFSET 64
#define RING_DATA_OFFSET 4096
#define FIRMWARE_ADDR 0x100000

#define BOOT_MAGIC 0x544F4F424F4C4F43ULL
#define FRAME_HEADER_SIZE 8
#define FRAME_ALIGN 8
#define MAX_FRAME_PAYLOAD 4096

#define FRAME_PAD 0
#define FRAME_OPEN 1
#define FRAME_DATA 2
#define FRAME_CLOSE 3

#define PORT_CONSOLE 0x3F8
#define PORT_TX_DOORBELL 0x500
#define PORT_CLOCK_LO 0x510
#define PORT_CLOCK_HI 0x514
#define PORT_WAIT 0x520
#define PORT_PANIC 0x530

#define WAIT_FOREVER 0xFFFFFFFFU

#endif
