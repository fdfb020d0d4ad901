"""API keys: which requests need one (writes when keys are configured; reads too with ``keys_for_reads``),
compared in constant time. A missing key is 401, a wrong one 403."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Sequence

from asymret.errors import ForbiddenError, UnauthorizedError

log = logging.getLogger("asymret.serve")


class ApiKeys:
    """The keys accepted in the X-API-Key header."""

    def __init__(self, keys: Sequence[str], *, for_reads: bool = False):
        self.keys, self.for_reads = list(keys), for_reads
        if not self.keys:
            log.warning("no API keys configured: anyone who can reach this server may add and delete")

    def authorize(self, key: str | None, *, write: bool) -> None:
        """Writes need a configured key when keys are configured; reads only with ``keys_for_reads``."""
        if not self.keys or not (write or self.for_reads):
            return
        if key is None:
            raise UnauthorizedError("this request needs an API key; send it in the X-API-Key header")
        if not any(hmac.compare_digest(key.encode(), k.encode()) for k in self.keys):
            raise ForbiddenError("the X-API-Key header holds no valid key; check the key")
