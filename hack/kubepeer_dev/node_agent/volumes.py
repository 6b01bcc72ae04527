"""Pod volumes as files under the pod's directory, the way a kubelet lays them out.

emptyDir -> a fresh directory; hostPath -> the path itself; persistentVolumeClaim -> its
bound PersistentVolume's hostPath or local path; configMap and secret -> one file per key
(honouring `items`); projected -> its sources in one directory, the ServiceAccount token
coming from the TokenRequest API bound to the pod.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from kubepeer_dev.node_agent.core import PodSpecError

Data = Mapping[str, str] | None


def _write(dest: Path, data: Mapping[str, str], items: list[dict[str, Any]] | None) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    pairs = [(i["key"], i["path"]) for i in items] if items else [(k, k) for k in data]
    for key, rel in pairs:
        if key not in data:
            raise PodSpecError(f"volume key '{key}' not found")
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(data[key])


def decode(data: Mapping[str, str] | None) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in (data or {}).items()}


def materialise(
    pod: Mapping[str, Any],
    pod_dir: Path,
    *,
    secret: Callable[[str], Data],
    config_map: Callable[[str], Data],
    token: Callable[[str | None, int], str],  # (audience, expirationSeconds) -> JWT
    claim: Callable[[str], str | None] = lambda name: None,  # PVC -> its bound PV's path
) -> dict[str, str]:
    """Create every volume; return volume name -> host directory."""
    dirs: dict[str, str] = {}
    for vol in pod["spec"].get("volumes") or []:
        name = vol["name"]
        dest = pod_dir / "volumes" / name
        if "emptyDir" in vol:
            dest.mkdir(parents=True, exist_ok=True)
        elif "hostPath" in vol:
            dest = Path(vol["hostPath"]["path"])
            if vol["hostPath"].get("type") == "DirectoryOrCreate":
                dest.mkdir(parents=True, exist_ok=True)
        elif "persistentVolumeClaim" in vol:
            ref = vol["persistentVolumeClaim"]["claimName"]
            path = claim(ref)
            if path is None:
                raise PodSpecError(
                    f"volume '{name}': PersistentVolumeClaim '{ref}' is not bound to a"
                    " hostPath or local PersistentVolume"
                )
            dest = Path(path)
        elif "configMap" in vol or "secret" in vol:
            is_secret = "secret" in vol
            src = vol["secret"] if is_secret else vol["configMap"]
            ref = src.get("secretName") if is_secret else src.get("name")
            data = (secret if is_secret else config_map)(ref)
            if data is None:
                if not src.get("optional"):
                    kind = "Secret" if is_secret else "ConfigMap"
                    raise PodSpecError(f"volume '{name}': {kind} '{ref}' not found")
                data = {}
            _write(dest, data, src.get("items"))
        elif "projected" in vol:
            _projected(pod, dest, vol["projected"], secret, config_map, token)
        else:
            kinds = ", ".join(k for k in vol if k != "name")
            raise PodSpecError(f"volume '{name}': {kinds} is not supported by the node agent")
        dirs[name] = str(dest)
    return dirs


def _projected(
    pod: Mapping[str, Any],
    dest: Path,
    projected: Mapping[str, Any],
    secret: Callable[[str], Data],
    config_map: Callable[[str], Data],
    token: Callable[[str | None, int], str],
) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for source in projected.get("sources") or []:
        if "serviceAccountToken" in source:
            sat = source["serviceAccountToken"]
            jwt = token(sat.get("audience"), sat.get("expirationSeconds", 3600))
            (dest / sat["path"]).write_text(jwt)
        elif "configMap" in source:
            data = config_map(source["configMap"]["name"]) or {}
            _write(dest, data, source["configMap"].get("items"))
        elif "secret" in source:
            data = secret(source["secret"]["name"]) or {}
            _write(dest, data, source["secret"].get("items"))
        elif "downwardAPI" in source:
            for item in source["downwardAPI"].get("items") or []:
                path = item.get("fieldRef", {}).get("fieldPath", "")
                value = {
                    "metadata.namespace": pod["metadata"]["namespace"],
                    "metadata.name": pod["metadata"]["name"],
                }.get(path)
                if value is None:
                    raise PodSpecError(f"downwardAPI fieldPath '{path}' is not supported")
                (dest / item["path"]).write_text(value)
