"""Check that ``--pretrained`` can be honoured before anything is built or downloaded.

open_clip downloads a pretrained tag's weights on first use (Hugging Face hub, else a URL) and only
fails after its retries time out. Here a tag is checked against open_clip's registry, then against
the local caches, and only when the weights are not cached is the download host probed (a few
seconds at most), so an offline machine gets a one-line answer at once.
"""
from __future__ import annotations

import os
import socket
import threading
import urllib.request
from typing import Optional, Tuple
from urllib.parse import urlparse

from .errors import WeightsUnavailableError

__all__ = ["check_pretrained", "is_weights_file"]

# How long a reachability probe of the download host may take before the host counts as unreachable.
PROBE_SECONDS = 3.0
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
_TRUE = ("1", "on", "yes", "true")


def is_weights_file(pretrained: str) -> bool:
    return os.path.isfile(pretrained)


def _looks_like_path(pretrained: str) -> bool:
    return os.path.sep in pretrained or pretrained.endswith(_WEIGHT_SUFFIXES)


def _reachable(host: str, port: int = 443, timeout: float = PROBE_SECONDS) -> Optional[str]:
    """None when a TCP connection to ``host`` opens within ``timeout`` s, else the reason it did not.

    Runs in a thread because name resolution ignores socket timeouts.
    """
    outcome = {}

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome["error"] = None
        except OSError as err:
            outcome["error"] = str(err) or type(err).__name__

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome.get("error", f"no answer within {timeout:.0f} s")


def _first_hop(url: str) -> Tuple[str, int]:
    """``(host, port)`` that a download of ``url`` connects to first: the HTTPS proxy at its own port (its scheme's
    default without one), unless ``NO_PROXY`` lists the host; else the host at the URL's port (443)."""
    parsed = urlparse(url)
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy and not urllib.request.proxy_bypass_environment(parsed.hostname or ""):
        hop = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        return hop.hostname or parsed.hostname, hop.port or (443 if hop.scheme == "https" else 80)
    return parsed.hostname, parsed.port or 443


def _hf_cached(hf_hub: str) -> Optional[str]:
    from huggingface_hub import try_to_load_from_cache
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    repo, filename = os.path.split(hf_hub)
    names = [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
    if filename.endswith((".bin", ".pth")):
        names.insert(0, filename[:-4] + ".safetensors")
    for name in names:
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str):
            return found
    return None


def check_pretrained(model_name: str, pretrained: str) -> None:
    """Raise :class:`WeightsUnavailableError` unless ``pretrained`` is a file or a tag of
    ``model_name`` whose weights are cached or downloadable from here.

    Args:
        model_name: an open_clip model name (a JSON config's name has no tags).
        pretrained: a local weights file or an open_clip pretrained tag (``openai``).
    """
    import open_clip
    from open_clip.pretrained import has_hf_hub

    alternative = "or pass a local weights file (--pretrained path/to/weights.pt)"
    if is_weights_file(pretrained):
        return
    if _looks_like_path(pretrained):
        raise WeightsUnavailableError(f"--pretrained {pretrained}: no such file; give an existing weights file "
                                      f"or an open_clip tag of {model_name}")
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        known = ", ".join(tags) if tags else "none"
        raise WeightsUnavailableError(f"--pretrained {pretrained!r} is not an open_clip tag of {model_name} "
                                      f"(its tags: {known}); {alternative}")
    if "file" in cfg:
        return
    where = f"{model_name}/{pretrained}"
    if has_hf_hub() and cfg.get("hf_hub"):
        if _hf_cached(cfg["hf_hub"]):
            return
        from huggingface_hub import constants

        cache = f"not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE:
            raise WeightsUnavailableError(f"--pretrained {pretrained}: the weights of {where} are {cache} and "
                                          f"HF_HUB_OFFLINE is set; download them where there is a network, {alternative}")
        url = constants.ENDPOINT or "https://huggingface.co"
    elif cfg.get("url"):
        target = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(cfg["url"]))
        if os.path.isfile(target):
            return
        cache = f"not cached ({target})"
        url = cfg["url"]
    else:
        raise WeightsUnavailableError(f"--pretrained {pretrained}: open_clip lists no source for {where}; "
                                      f"{alternative}")
    host = urlparse(url).hostname
    error = _reachable(*_first_hop(url))
    if error is not None:
        raise WeightsUnavailableError(f"--pretrained {pretrained}: the weights of {where} are {cache} and {host} "
                                      f"cannot be reached ({error}); download them where there is a network, "
                                      f"{alternative}")
