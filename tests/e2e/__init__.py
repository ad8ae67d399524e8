"""End-to-end tests (a package, so their module names never clash with unit or integration tests)."""
