"""Run logging: metrics.jsonl (one JSON object per record), TensorBoard, a progress bar."""
from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm import tqdm

SHOWN = ("mean@k", "pass@k", "reward_mean", "labeled_acc", "critic_auroc_heldout")


class RunLogger:
    def __init__(self, run_dir: Path, total_steps: int, tensorboard: bool, progress: bool, desc: str,
                 enabled: bool = True, resume_step: int | None = None):
        """`resume_step`: continue a run from its checkpoint at that step; records logged after
        it (by the life that was killed) are dropped, so that no step appears twice."""
        self.enabled = enabled  # False on ranks other than 0: they log nothing
        if not enabled:
            return
        path = run_dir / "metrics.jsonl"
        if resume_step is not None:
            _truncate_after(path, resume_step)
        self.file = open(path, "a")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1  # TensorBoard hides later events
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)
        self.bar = tqdm(total=total_steps, initial=resume_step or 0, desc=desc, disable=not progress,
                        dynamic_ncols=True)
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


def _truncate_after(path: Path, step: int) -> None:
    """Keep the records up to `step`; a last line torn by a kill is dropped too."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record["step"] <= step:
            kept.append(line + "\n")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
