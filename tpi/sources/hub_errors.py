"""What went wrong talking to the hub, said in one line: which model, which
request, and what to do about it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from tpi.errors import ModelError
from tpi.sources.hub_ref import HubRef

NETWORK_MODULES = ("httpx", "httpx2", "httpcore", "requests", "urllib3")


class PullError(ModelError):
    pass


def _network_failure(e: BaseException) -> bool:
    return isinstance(e, (ConnectionError, TimeoutError)) or (
        type(e).__module__.split(".")[0] in NETWORK_MODULES
    )


@contextmanager
def hub_errors(ref: HubRef, tried: str) -> Iterator[None]:
    """Turn what huggingface_hub raises during `tried` (e.g. "GET URL") into a PullError."""
    from huggingface_hub import errors

    host = tried.split()[-1].split("/api/")[0].split(f"/{ref.repo}/")[0]
    try:
        yield
    except errors.OfflineModeIsEnabled:
        raise PullError(
            f"not downloading {ref}: HF_HUB_OFFLINE is set (unset it, or pass a model directory)"
        ) from None
    except errors.GatedRepoError:
        raise PullError(
            f"{ref.repo} is gated: accept its terms at {host}/{ref.repo} and set HF_TOKEN "
            "to an access token of that account"
        ) from None
    except errors.RepositoryNotFoundError:
        raise PullError(
            f"no model {ref.repo} at {host} (if it is private or gated, set HF_TOKEN)"
        ) from None
    except errors.RevisionNotFoundError:
        raise PullError(f"{ref.repo} has no revision {ref.revision!r} at {host}") from None
    except errors.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", "?")
        raise PullError(f"{host} answered HTTP {status} to {tried} (for {ref})") from None
    except PullError:
        raise
    except Exception as e:
        if not (_network_failure(e) or isinstance(e, OSError)):
            raise
        raise PullError(
            f"cannot download {ref}: {tried} failed ({type(e).__name__}: {e}); "
            "check the network (or HF_ENDPOINT, or pass a model directory)"
        ) from None
