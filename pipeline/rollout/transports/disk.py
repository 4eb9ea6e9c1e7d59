"""sync_method "disk": safetensors shards plus the checkpoint's config files in
`rollout.sync_dir/weights-v<version>` (default: the engine's scratch directory), then
`update_weights_from_disk`. The directory is also what a restarted server loads (`Sent.checkpoint`);
the previous version's directory is removed once the servers loaded the new one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline import hf_io
from pipeline.rollout.transports.common import Sent, bucketed


class DiskTransport:
    def __init__(self, client, cfg, workdir):
        self.client, self.cfg = client, cfg
        self.root = Path(cfg.sync_dir or workdir)
        self.previous: Path | None = None

    def send(self, named, version: str) -> Sent:
        path = self.root / f"weights-v{version}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        nbytes, ntensors = hf_io.write_weights_dir(
            path, bucketed(named, self.cfg.bucket_bytes), side_files_from=Path(self.cfg.model_path)
        )
        sent = Sent(nbytes, ntensors, checkpoint=str(path))
        self.client.control("update_weights_from_disk", {"model_path": str(path), "weight_version": version})
        if self.previous is not None and self.previous != path:
            shutil.rmtree(self.previous, ignore_errors=True)
        self.previous = path
        return sent

    def close(self) -> None:
        pass
