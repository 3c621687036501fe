"""Built-in suites (TOML files shipped as package data)."""
