"""The proxy's Lua scripts, run by EVALSHA straight through the client's ``execute_command``.

redis-py's ``AsyncScript.__call__`` imports ``Pipeline`` and checks its client against it
(an ``isinstance`` through a ``typing.Protocol``, which is slow) on every call, then goes
through ``evalsha``'s wrappers: about 3 % of the proxy's CPU at three scripts a message. The
commands on the wire are the same, and so is the recovery: a Redis that forgot the script
(restarted, ``SCRIPT FLUSH``) answers NOSCRIPT, the script is loaded and run once more. The
SHA1 does not depend on the client, so one object serves every client, Cluster included
(which routes EVALSHA by its keys).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from redis.exceptions import NoScriptError


class LuaScript:
    __slots__ = ("source", "sha")

    def __init__(self, source: str):
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, redis, keys: Sequence, args: Sequence = ()):
        try:
            return await redis.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await redis.script_load(self.source)
            return await redis.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
