"""The qemu backend: the user's own Linux VM under QEMU's COLO, driven over QMP.

`command` builds the two QEMU command lines, `plan` the QMP sequences,
`process` runs one QEMU, `colo` drives a primary or a secondary,
`checkpoints` reads checkpoint figures from QEMU's trace.
"""
