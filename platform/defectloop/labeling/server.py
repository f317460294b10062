"""A local Label Studio for demos and tests (real server, 127.0.0.1 only, its own data dir).

The settings are the ones measured to matter (DESIGN.md section 6): the bind address is
``--internal-host``; a legacy API token needs ``--enable-legacy-api-token``; local images need
LOCAL_FILES_SERVING_ENABLED and a document root; webhooks and S3 on 127.0.0.1 need
USE_DEFAULT_BANNED_SUBNETS=false; and the bare USERNAME/PASSWORD/PORT variables are dropped, since
Label Studio falls back to them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from defectloop.process import ManagedProcess, free_port

USER, PASSWORD = "admin@example.com", "defectloop"
TOKEN = "0123456789abcdef0123456789abcdef01234567"


def label_studio(data_dir: str | Path, document_root: str | Path, port: int | None = None, token: str = TOKEN,
                 user: str = USER, password: str = PASSWORD) -> ManagedProcess:
    """A Label Studio process (not started yet); ``.token``, ``.root``, ``.user`` and ``.password`` come along."""
    data_dir, port = Path(data_dir), port or free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("USERNAME", "PASSWORD", "PORT", "HOST")}
    env.update(LABEL_STUDIO_BASE_DATA_DIR=str(data_dir), LATEST_VERSION_CHECK="false", LABEL_STUDIO_USERNAME=user,
               LABEL_STUDIO_PASSWORD=password, LABEL_STUDIO_USER_TOKEN=token, LOCAL_FILES_SERVING_ENABLED="true",
               LOCAL_FILES_DOCUMENT_ROOT=str(Path(document_root).resolve()), USE_DEFAULT_BANNED_SUBNETS="false",
               LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK="true")
    exe = Path(sys.executable).with_name("label-studio")
    if not exe.exists():
        raise FileNotFoundError(f"{exe}: Label Studio is not installed here (pip install 'defectloop[dev]')")
    proc = ManagedProcess("label-studio", [str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1",
                                           "--port", str(port), "--data-dir", str(data_dir), "--enable-legacy-api-token"],
                          env, f"http://127.0.0.1:{port}", data_dir.parent / f"{data_dir.name}-label-studio.log")
    proc.token, proc.root, proc.user, proc.password = token, Path(document_root).resolve(), user, password
    return proc
