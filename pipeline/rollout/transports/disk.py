"""sync_method "disk": safetensors shards plus the checkpoint's config files in
`rollout.sync_dir/weights-v<version>` (default: the engine's scratch directory), then
`update_weights_from_disk`. The directory is also what a restarted server loads (`Sent.checkpoint`);
the previous version's directory is removed once the servers loaded the new one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.rollout.transports.common import Sent, bucketed, nbytes


class DiskTransport:
    def __init__(self, client, cfg, workdir):
        self.client, self.cfg = client, cfg
        self.root = Path(cfg.sync_dir or workdir)
        self.previous: Path | None = None

    def send(self, named, version: str) -> Sent:
        from safetensors.torch import save_file

        path = self.root / f"weights-v{version}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        # TODO(hf_io): the HF checkpoint's non-weight files, to be chosen by the one HF I/O module.
        for f in Path(self.cfg.model_path).iterdir():  # config, generation config, tokenizer
            if (
                f.is_file()
                and not f.name.endswith((".safetensors", ".bin", ".pt"))
                and ".safetensors" not in f.name
            ):
                shutil.copy2(f, path / f.name)
        sent = Sent(0, 0, checkpoint=str(path))
        index = {}
        buckets = list(bucketed(named, self.cfg.bucket_bytes))
        for k, bucket in enumerate(buckets):
            shard = f"model-{k + 1:05d}-of-{len(buckets):05d}.safetensors"
            save_file(
                {n: t.detach().cpu().contiguous() for n, t in bucket}, str(path / shard), {"format": "pt"}
            )
            for n, t in bucket:
                index[n] = shard
                sent.nbytes += nbytes(t)
                sent.ntensors += 1
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": sent.nbytes}, "weight_map": index})
        )
        self.client.control("update_weights_from_disk", {"model_path": str(path), "weight_version": version})
        if self.previous is not None and self.previous != path:
            shutil.rmtree(self.previous, ignore_errors=True)
        self.previous = path
        return sent

    def close(self) -> None:
        pass
