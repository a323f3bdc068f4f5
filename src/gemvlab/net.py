"""One quick reachability probe, asked before a library that retries an unreachable server
for a minute or more (the hub's datasets, wandb) and then ends in a traceback."""

from __future__ import annotations

PROBE_TIMEOUT_S = 5.0


def unreachable(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why ``url`` does not answer within ``timeout_s``, or None when it does (any HTTP
    status counts as an answer)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"),
                               timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return None
    except OSError as err:
        return f"{url} unreachable: {getattr(err, 'reason', err)}"
    return None
