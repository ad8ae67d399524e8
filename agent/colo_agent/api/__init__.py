"""The agent's control API: the versioned contract (`models`) and its HTTP server (`server`).

Importing this package imports nothing else: the operator reads `colo_agent.api.models`
without pulling in aiohttp or prometheus-client.
"""
