"""Named phase ranges and a profiling window (`run.profile_steps=A-B`).

Every phase of a step (rollout, old log-probs, values, advantages, E-step, M-step, weight
sync) runs inside `phase(name)`: an NVTX range on GPUs, for Nsight Systems, and a
`torch.profiler.record_function` range everywhere (free when no profiler listens). The window
opens before step A and closes after step B: on GPUs with cudaProfilerStart/Stop, so that

    nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop -t cuda,nvtx \\
        torchrun ... -m tempo.cli train ... run.profile_steps=3-4

records only those steps. torch.profiler records the same window (CPU, and CUDA kernels on a
GPU): its Chrome trace (the same ranges) lands in the run directory as
`profile/steps_A-B.json`, and a table of the ops and kernels that took the most time as
`profile/steps_A-B.txt` (the GPU machines this project is lent have no working nsys).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from tempo.errors import ConfigError


@contextlib.contextmanager
def phase(name: str):
    nvtx = torch.cuda.is_available()
    if nvtx:
        torch.cuda.nvtx.range_push(name)
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        if nvtx:
            torch.cuda.nvtx.range_pop()


def parse_steps(text: str) -> tuple[int, int] | None:
    """'A-B' -> (A, B), both steps included; '' -> None. (Not A:B, which YAML reads as a number.)"""
    if not text:
        return None
    try:
        first, last = (int(x) for x in text.split("-"))
    except ValueError:
        raise ConfigError(f"run.profile_steps: expected A-B (first and last step), got {text!r}") from None
    if not 1 <= first <= last:
        raise ConfigError(f"run.profile_steps: need 1 <= A <= B, got {text!r}")
    return first, last


class ProfileWindow:
    """Opens before the window's first step and closes after its last (on CPU, only the rank
    that writes the run directory traces)."""

    def __init__(self, steps: str, run_dir: Path, writer: bool = True):
        self.window, self.run_dir, self.writer, self.profiler = parse_steps(steps), run_dir, writer, None

    def before(self, step: int) -> None:
        if self.window is None or step != self.window[0]:
            return
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.profiler.start()
        if self.writer:
            activities = [torch.profiler.ProfilerActivity.CPU]
            activities += [torch.profiler.ProfilerActivity.CUDA] * cuda
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.start()

    def after(self, step: int) -> None:
        if self.window is None or step != self.window[1]:
            return
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
        if self.profiler is not None:
            self.profiler.stop()
            out = self.run_dir / "profile" / f"steps_{self.window[0]}-{self.window[1]}"
            out.parent.mkdir(parents=True, exist_ok=True)
            self.profiler.export_chrome_trace(str(out.with_suffix(".json")))
            sort = "self_device_time_total" if cuda else "self_cpu_time_total"
            out.with_suffix(".txt").write_text(self.profiler.key_averages().table(sort_by=sort, row_limit=40))
            self.profiler = None
