"""The `tempo` command: train, eval, compare, config and plan."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from tempo.errors import ConfigError, TempoError

DEFAULT_CONFIG = "configs/tiny_cpu.yaml"

OVERRIDES_HELP = ("section.key=value overrides applied after the config file, e.g. train.steps=10 "
                  "algorithm.method=ttrl (`tempo config --keys` lists every key)")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=DEFAULT_CONFIG,
                   help=f"YAML run config (default: {DEFAULT_CONFIG}; 'none' for built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help=OVERRIDES_HELP)


def _load(args):
    from tempo.config import load_config

    return load_config(None if args.config == "none" else args.config, args.overrides)


def cmd_train(args) -> None:
    from tempo.train import train

    if args.resume_force:
        args.overrides.append("run.resume=force")
    elif args.resume:
        args.overrides.append("run.resume=auto")
    train(_load(args))


def cmd_eval(args) -> None:
    from tempo.evaluate import evaluate_checkpoint

    evaluate_checkpoint(_load(args), args.checkpoint)


def cmd_compare(args) -> None:
    from tempo.compare import compare

    compare(_load(args), args.methods.split(","), args.out, [int(s) for s in args.seeds.split(",")],
            [int(s) for s in args.at.split(",")] if args.at else None, args.name)


def cmd_config(args) -> None:
    from tempo.config import describe_keys, save_config

    if args.keys:
        for key, typ, default, help in describe_keys():
            print(f"{key:36s} {typ:15s} {default!r:22s} {help}")
        return
    save_config(_load(args), "/dev/stdout")


def cmd_plan(args) -> None:
    from tempo.plan import plan

    cfg = _load(args)
    result = plan(cfg, args.world_size, args.gpu_gb)
    print(f"Memory plan: {cfg.model.backend} backend, TP {cfg.model.tensor_parallel}, PP {cfg.model.pipeline_parallel}, "
          f"world size {args.world_size}, {args.gpu_gb:g} GB GPUs\n")
    print(result.table())
    if not result.fits:
        raise ConfigError(f"memory plan: {result.reason()}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tempo",
        description="TEMPO: test-time training of reasoning models by Expectation-Maximisation. "
                    "The E-step recalibrates a critic on a small labeled set; the M-step refines the "
                    "policy on unlabeled prompts with the critic's value as reward.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for configuration and data errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run a method (stage 1, then the EM loop) and write a run directory",
                       description="Build the base model if needed, run stage 1 (the critic trained on labeled "
                                   "rollouts of its own data, then optional RLVR steps; cached), then the configured method's loop; writes config.yaml, metrics.jsonl, "
                                   "TensorBoard logs, checkpoints, curves.png and summary.md to run.out_dir.")
    _config_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest whole checkpoint in run.out_dir (same config required)")
    p.add_argument("--resume-force", action="store_true", help="resume even if the config changed")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a policy checkpoint on D_U (mean@k, pass@k, maj@k, diversity)")
    _config_args(p)
    p.add_argument("--checkpoint", required=True, help="Hugging Face checkpoint directory of the policy")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="run several methods from one base model and budget; table + plot",
                       description="Runs each method with the same config and budget for every seed, then writes "
                                   "NAME.md (final step, mean ± std over seeds) and NAME.png to --out; runs that "
                                   "finished there under the same config are read, not run again.")
    _config_args(p)
    p.add_argument("--methods", default="tempo,ttrl,empo,m-step-only",
                   help="comma-separated methods (default: %(default)s)")
    p.add_argument("--out", default="runs/compare", help="output folder (default: %(default)s)")
    p.add_argument("--seeds", default="0", help="comma-separated train.seed values (default: %(default)s)")
    p.add_argument("--at", default="", help="comma-separated steps to tabulate, each one the runs evaluate "
                                            "(default: the final step)")
    p.add_argument("--name", default="comparison", help="file name of the table and the figure (default: %(default)s)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("plan", help="per-GPU memory of a config's layout; exit 2 when it does not fit",
                       description="Weights, gradients and AdamW state of the policy and the critic, activations "
                                   "of one micro-batch at the longest sequence, and vLLM's share, per GPU.")
    _config_args(p)
    p.add_argument("--world-size", type=int, default=8, help="GPUs in the run (default: %(default)s)")
    p.add_argument("--gpu-gb", type=float, default=80, help="memory of one GPU in GiB (default: %(default)s)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("config", help="print the resolved config, or every key with --keys")
    _config_args(p)
    p.add_argument("--keys", action="store_true", help="list every config key with its type and default")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # transformers' per-file loading and saving bars say nothing about a run's progress
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    debug = args.debug or os.environ.get("TEMPO_DEBUG") == "1"
    try:
        args.func(args)
    except TempoError as err:
        if debug:
            raise
        print(f"tempo: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
