"""The Hugging Face hub from a machine that may have no network.

huggingface_hub retries a failed request five times with backoff (~25 s), even when the hub's
host name does not resolve at all, so on an offline machine a mistyped model or dataset name took
half a minute to be refused. When the host does not resolve, lookups run in offline mode instead:
the local Hugging Face cache answers, or the error comes at once.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import urlparse

T = TypeVar("T")


def unresolved_host() -> str | None:
    """The hub's host name when it does not resolve (a machine without network), else None."""
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or ""
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return host
    return None


@contextmanager
def offline_if_unreachable() -> Iterator[str | None]:
    """Run hub lookups (transformers, datasets) from the local cache only while the hub's host does
    not resolve; yields that host, or None when it resolves (and nothing changes)."""
    host = unresolved_host()
    if host is None:
        yield None
        return
    import datasets.config
    from huggingface_hub import constants

    # Both libraries read these flags at call time; set them for this block only.
    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield host
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def from_pretrained(load: Callable[..., T], path: str, **kwargs: Any) -> T:
    """`load(path, **kwargs)`, a transformers `from_pretrained`. A local folder loads as is; a hub id
    loads from the local cache alone while the hub's host does not resolve, instead of retrying
    every file it looks up (a cached hub model took 2.5 minutes to load on an offline driver and as
    long again on each worker)."""
    if os.path.isdir(path):
        return load(path, **kwargs)
    with offline_if_unreachable() as unresolved:
        return load(path, **({"local_files_only": True, **kwargs} if unresolved else kwargs))


def offline_note(host: str | None) -> str:
    return f"{host} does not resolve (offline), and it is not in the local Hugging Face cache" if host else ""
