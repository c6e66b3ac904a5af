"""The precompute cache: a key derived from everything that changes the enriched dataset, and an
all-or-nothing commit that works on a local disk and on object stores (s3://, gs://) alike.

Layout: <root>/<key>/attempt-<id>/{train,eval}/*.parquet, summary.json, classifier.json
        <root>/<key>/COMPLETE.json   ← written last, names the attempt; nothing else is trusted.
A crashed pass leaves an attempt directory without COMPLETE.json, which no later run reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import fsspec

PASS_VERSION = 2  # 2: fused scoring actors, seeded local shuffle, reference in the training dtype


def cache_key(parts: dict) -> str:
    blob = json.dumps({"pass_version": PASS_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class Cache:
    def __init__(self, root: str, key: str):
        self.fs, self.root = fsspec.core.url_to_fs(root)
        self.protocol = root.split("://")[0] if "://" in root else None
        self.key = key
        self.key_dir = f"{self.root}/{key}"

    def uri(self, path: str) -> str:
        return f"{self.protocol}://{path}" if self.protocol else path

    def complete(self) -> dict | None:
        """The committed attempt's record, or None when there is no complete cache under this key."""
        marker = f"{self.key_dir}/COMPLETE.json"
        if not self.fs.exists(marker):
            return None
        with self.fs.open(marker, "r") as f:
            record = json.load(f)
        if not self.fs.exists(f"{self.key_dir}/{record['attempt']}/summary.json"):
            return None
        return record

    def new_attempt(self) -> str:
        attempt = f"attempt-{uuid.uuid4().hex[:12]}"
        self.fs.makedirs(f"{self.key_dir}/{attempt}", exist_ok=True)
        return attempt

    def write_json(self, path: str, obj: dict) -> None:
        with self.fs.open(path, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)

    def commit(self, attempt: str, record: dict) -> None:
        """Publish the attempt: one atomic write (rename on a local disk, a single PUT on object stores)."""
        marker = f"{self.key_dir}/COMPLETE.json"
        body = json.dumps({"attempt": attempt, **record}, indent=2, sort_keys=True, default=str)
        if self.protocol in (None, "file", "local"):
            tmp = Path(f"{marker}.tmp-{uuid.uuid4().hex[:8]}")
            tmp.write_text(body)
            os.replace(tmp, marker)
        else:
            with self.fs.open(marker, "w") as f:
                f.write(body)

    def invalidate(self) -> None:
        marker = f"{self.key_dir}/COMPLETE.json"
        if self.fs.exists(marker):
            self.fs.rm(marker)
