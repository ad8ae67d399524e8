"""The micro-VM guest backend: a small monitor over KVM or unicorn (tcg)."""
