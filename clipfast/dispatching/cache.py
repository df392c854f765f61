"""Choices kept on disk: ``dispatch.json`` under ``cache_dir()`` (``CLIPFAST_CACHE_DIR``, else
``$XDG_CACHE_HOME/clipfast``, else ``~/.cache/clipfast``), one section per environment (the GPU's name and the
torch, triton and clipfast versions), so an upgrade re-tunes."""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch

from clipfast.kernels.environment import cache_dir, versions, warn_once

def cache_path() -> str:
    return os.path.join(cache_dir(), "dispatch.json")


def environment(device: torch.device) -> str:
    """The cache section of ``device``: its name and the versions a choice depends on."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return "|".join([name] + [f"{k} {v}" for k, v in versions().items()])


class DiskCache:
    """``{"format": 1, "environments": {environment: {key_text: {"choice": name, "ms": {...}}}}}``, read once
    per process and rewritten (atomically, merged with what is on disk) after each tuning."""

    FORMAT = 1

    def __init__(self):
        self._data: Optional[dict] = None
        self._env: dict[Any, str] = {}

    def _read(self) -> dict:
        try:
            with open(cache_path()) as f:
                data = json.load(f)
            if data.get("format") == self.FORMAT and isinstance(data.get("environments"), dict):
                return data
        except (OSError, ValueError, AttributeError):
            pass
        return {"format": self.FORMAT, "environments": {}}

    def _section(self, device: torch.device) -> dict:
        if self._data is None:
            self._data = self._read()
        env = self._env.get(device)
        if env is None:
            env = self._env[device] = environment(device)
        return self._data["environments"].setdefault(env, {})

    def lookup(self, device: torch.device, key: str) -> Optional[dict]:
        return self._section(device).get(key)

    def store(self, device: torch.device, key: str, entry: dict) -> None:
        self._section(device)[key] = entry
        env = self._env[device]
        path = cache_path()
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            merged = self._read()
            merged["environments"].setdefault(env, {}).update(self._data["environments"][env])
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(merged, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError as exc:
            warn_once("dispatch_cache_write", f"dispatch: cannot write the tuning cache {path} ({exc})")

    def entries(self, device: torch.device) -> dict:
        return dict(self._section(device))
