"""Run logging: metrics.jsonl (one JSON object per record), TensorBoard, a progress bar."""
from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm import tqdm

SHOWN = ("mean@k", "pass@k", "reward_mean", "labeled_acc", "critic_auroc_heldout")


class RunLogger:
    def __init__(self, run_dir: Path, total_steps: int, tensorboard: bool, progress: bool, desc: str,
                 enabled: bool = True):
        self.enabled = enabled  # False on ranks other than 0: they log nothing
        if not enabled:
            return
        self.file = open(run_dir / "metrics.jsonl", "a")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.bar = tqdm(total=total_steps, desc=desc, disable=not progress, dynamic_ncols=True)
        self.live: dict[str, float] = {}

    def log(self, step: int, phase: str, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
        self.file.write(json.dumps({"step": step, "phase": phase, **clean}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(f"{phase}/{k}", v, step)
        self.live.update({k: v for k, v in metrics.items() if k in SHOWN})
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in self.live.items()}, refresh=True)

    def advance(self) -> None:
        if self.enabled:
            self.bar.update(1)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
