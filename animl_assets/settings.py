"""Deployment settings read from the environment, in one place (the core never reads env vars)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping


@dataclass(frozen=True)
class Settings:
    """Where everything lives. Defaults make an embedded, credential-free set-up under ANIML_HOME."""

    home: Path
    storage_uri: str
    exports_uri: str
    images_uri: str
    s3_endpoint_url: str | None
    s3_region: str

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        home = Path(env.get("ANIML_HOME") or ".animl").expanduser().absolute()
        return cls(
            home=home,
            storage_uri=env.get("ANIML_STORAGE_URI") or str(home / "artifacts"),
            exports_uri=env.get("ANIML_EXPORTS_URI") or str(home / "exports"),
            images_uri=env.get("ANIML_IMAGES_URI") or "",
            s3_endpoint_url=env.get("ANIML_S3_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL") or None,
            s3_region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        )
