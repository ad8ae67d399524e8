"""Helpers shared by test modules: worlds, guests, agent processes. No tests live here.

`tests/conftest.py` puts `tests/` on `sys.path`, so a test imports these as
`from support.operator_world import world`.
"""
