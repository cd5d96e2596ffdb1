"""Pure decision logic: no I/O, no kopf, no aiohttp, no kubernetes imports."""
