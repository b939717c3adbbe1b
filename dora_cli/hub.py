"""The Hugging Face Hub: asked once per process whether it answers, so that an unreachable hub costs seconds.

    access = hub.access()                          # Access(endpoint, offline, problem)
    with hub.loading(name, where, access):         # one line naming HF_HUB_OFFLINE when it fails
        AutoTokenizer.from_pretrained(name, **access.from_pretrained_kwargs())

Why: huggingface_hub retries a failed metadata request with backoff (5 retries, 1 + 2 + 4 + 8 + 8 s), once per
file a loader asks for, so a model id on a machine without the hub took about 50 s to fail. Here:

- `HF_HUB_OFFLINE=1` (as huggingface_hub read it): the hub is never asked; a model comes from the local
  cache or fails at once, and the message names the variable;
- otherwise the endpoint (`HF_ENDPOINT`, default https://huggingface.co) is probed once per process with
  one HEAD request and a short timeout (`HF_HUB_ETAG_TIMEOUT` when set, else PROBE_TIMEOUT seconds); when
  it does not answer, models load from the local cache only (`local_files_only`), and a model that is not
  there fails with one line saying that `HF_HUB_OFFLINE=1` makes this immediate. Any HTTP answer, even an
  error status, counts as an answer: the loaders then report what the hub said.
"""

from __future__ import annotations

import contextlib
import functools
import os
import urllib.error
import urllib.request
from dataclasses import dataclass

from dora_cli.errors import UserError, clip

PROBE_TIMEOUT = 5.0
"""Seconds the probe waits for the hub (`HF_HUB_ETAG_TIMEOUT` overrides it)."""


@dataclass(frozen=True)
class Access:
    """How the hub can be used in this process."""

    endpoint: str
    offline: bool  # HF_HUB_OFFLINE
    problem: str | None  # why the probe got no answer; None when it did (or was not sent)

    @property
    def local_only(self) -> bool:
        return self.offline or self.problem is not None

    def from_pretrained_kwargs(self, model: bool = False) -> dict:
        """`local_files_only` when the hub is off or silent. For a model also inside `adapter_kwargs`: the
        AutoModel loaders look for a PEFT adapter_config.json with their own download settings (transformers
        5.24 does not pass local_files_only on), which would retry an unreachable hub for ~23 s."""
        if not self.local_only:
            return {}
        return {"local_files_only": True, **({"adapter_kwargs": {"local_files_only": True}} if model else {})}

    def why_not(self) -> str:
        """Why a name that is not in the local cache cannot be downloaded (empty when it can be)."""
        if self.offline:
            return "HF_HUB_OFFLINE=1 keeps the hub from being asked (unset it to download)"
        if self.problem is not None:
            return (f"the hub at {self.endpoint} does not answer ({self.problem}); HF_HUB_OFFLINE=1 makes this "
                    "immediate, HF_ENDPOINT names another hub")
        return ""


def access() -> Access:
    """The hub's state: HF_HUB_OFFLINE as huggingface_hub honours it, else one probe of the endpoint (cached)."""
    from huggingface_hub import constants

    offline = bool(constants.is_offline_mode())
    endpoint = constants.ENDPOINT
    return Access(endpoint, offline, None if offline else probe(endpoint, _timeout()))


def _timeout() -> float:
    from huggingface_hub import constants

    return float(constants.HF_HUB_ETAG_TIMEOUT) if os.environ.get("HF_HUB_ETAG_TIMEOUT") else PROBE_TIMEOUT


@functools.cache
def probe(endpoint: str, timeout: float) -> str | None:
    """None when `endpoint` gives any HTTP answer within `timeout` seconds, else what went wrong."""
    request = urllib.request.Request(endpoint, method="HEAD")
    try:
        urllib.request.urlopen(request, timeout=timeout).close()  # noqa: S310 - the hub's own URL
    except urllib.error.HTTPError:
        return None  # an answer, if not a welcome one
    except urllib.error.URLError as err:
        return clip(str(getattr(err, "reason", err)), 120)
    except (OSError, ValueError) as err:  # timeouts, resets, a malformed HF_ENDPOINT
        return clip(f"{type(err).__name__}: {err}", 120)
    return None


@contextlib.contextmanager
def loading(name: str, where: str, hub: Access):
    """An OSError from a hub loader (not found, not cached, unreachable) as one line saying why."""
    try:
        yield
    except OSError as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if hub.local_only:
            from huggingface_hub import constants

            reason = f"it is not in the local cache ({constants.HF_HUB_CACHE}) and {hub.why_not()}"
        raise UserError(
            f"{name!r} is not a local path and could not be loaded from the Hugging Face Hub: {reason}", where=where
        ) from err
