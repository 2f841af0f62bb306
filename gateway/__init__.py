"""Both APIs behind one port, for a single machine (`make run`).

In the Compose stack Traefik does this routing; here a small ASGI app does it:
reads (GET, HEAD) go to the query API, everything else to the command API.
"""
