"""Facts that several parts of the project must agree on, each written once.

The guest interface, the wire protocol, the agent's command line and the
operator's spec parser (and through it the CRD) all read these. Standard
library only and no imports at all, so the operator and the sans-IO protocol
can both depend on it.
"""

from __future__ import annotations

from typing import Final

# Guest page: the unit of dirty tracking, of the colo cache and of PAGES frames.
PAGE_SIZE: Final = 4096

# Data channels one checkpoint stream is striped across. Each is a TCP
# connection with its own task on both agents; past a handful of channels a
# stream on these machines' few cores gains nothing, so 16 is generous, and the
# decoder refuses more (a corrupted HELLO must not make a receiver allocate
# per-channel state for thousands).
MAX_CHANNELS: Final = 16

# Failover timing defaults: a heartbeat every 100 ms, the peer lost after 500 ms
# of silence (five missed beats, so one slow beat on a busy node is no failover).
HEARTBEAT_INTERVAL_MS: Final = 100
HEARTBEAT_TIMEOUT_MS: Final = 500

# Guest RAM a ColoVM may have: the micro-VM's ABI bounds (docs/guest-abi.md),
# which the operator enforces on spec.guest.memory.
MIN_GUEST_RAM: Final = 4 << 20
MAX_GUEST_RAM: Final = 1 << 30

# Checkpoint interval defaults. Lockstep checkpoints only bound the divergence
# of state that produces no output (matching output leaves at once), so they
# can be far apart.
CHECKPOINT_INTERVAL_MS: Final = 100
LOCKSTEP_CHECKPOINT_INTERVAL_MS: Final = 2000
CHANNELS: Final = 2  # data channels by default

# Exit status of an agent that failed before any client reached a guest it booted
# itself (a fresh primary that could not take its term, or whose clients never
# came): nothing a client saw is lost, so the operator starts a new primary
# instead of declaring the VM Failed. Other failures exit 1, usage errors 2.
EXIT_NEVER_SERVED: Final = 3

# The agent's ports: clients (RESP), the control API, replication.
CLIENT_PORT: Final = 6379
CONTROL_PORT: Final = 8080
REPLICATION_PORT: Final = 7700
