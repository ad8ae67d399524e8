/* Shared between the protocol layer (resp.c) and the commands (commands.c). */
#ifndef COLO_KV_INTERNAL_H
#define COLO_KV_INTERNAL_H

#include "kv.h"

struct arg {
    const u8 *p;
    u64 n;
};

/* Replies go to the connection whose command is executing. */
void reply_raw(const void *p, u64 n);
#define reply_lit(s) reply_raw((s), sizeof(s) - 1)
void reply_error(const char *msg); /* msg without the leading '-' or CRLF */
void reply_int(i64 v);
void reply_bulk(const u8 *p, u64 n);
void reply_nil(void);
void reply_array(u64 n);
/* `n` key/value pairs: a RESP3 map, or a flat array of 2n under RESP2. */
void reply_map(u64 n);

/* The reply protocol of the current connection (2 or 3, chosen by HELLO).
 * RESP3 only changes nulls and maps for the commands served here. */
int current_protocol(void);
void set_protocol(int version);

/* Commands the protocol layer must see: QUIT closes after its reply. */
void request_close(void);
u32 current_conn(void);
u64 boot_time_ns(void);
u64 commands_processed(void);
u64 open_connections(void);

void execute_command(struct arg *argv, u64 argc);

#endif
