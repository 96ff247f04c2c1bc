"""`python -m lightning_mim.train [overrides]`: one training run from the Hydra config in `conf/`.

Compose the config (or read the file a sweep's driver wrote), check it (`orchestration.schema`), and
only then load torch and Lightning to train it (`orchestration.training.run`): a typo is refused in
about a second, before any data, tokenizer or model is touched.
"""

from __future__ import annotations

import json
import sys
from typing import Sequence

from omegaconf import OmegaConf

from lightning_mim.orchestration.config import ConfigError, absolutize_paths, compose, config_groups, group_options, report_config_error
from lightning_mim.orchestration.protocol import read_config
from lightning_mim.orchestration.schema import check_config


def _print_help() -> None:
    lines = [
        "usage: python -m lightning_mim.train [KEY=VALUE | GROUP=OPTION ...] [--cfg]",
        "",
        "One training run from conf/train.yaml. Config groups and their options:",
    ]
    for group in config_groups():
        lines.append(f"  {group:<12} {', '.join(group_options(group))}")
    lines += [
        "",
        "examples:",
        "  python -m lightning_mim.train                                  # digits MaskGIT (default)",
        "  python -m lightning_mim.train experiment=digits_tokenizer",
        "  python -m lightning_mim.train schedule=sqrt decode.steps=12 trainer.max_steps=200",
        "  python -m lightning_mim.train run_name=myrun ckpt_path=last     # resume a killed run",
        "  --cfg   print the composed config and exit",
        "  --stages-only   train (or find) the earlier stages the run needs, e.g. its tokenizer, and exit",
        "  --config=FILE   run the config in FILE as it is (what a sweep's driver writes for each trial)",
    ]
    print("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        _print_help()
        return 0
    show_cfg = "--cfg" in argv
    stages_only = "--stages-only" in argv
    config_file = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    overrides = [a for a in argv if a not in ("--cfg", "--stages-only") and not a.startswith("--config=")]
    try:
        if config_file and overrides:
            raise ConfigError(f"--config={config_file}: give the config file or overrides, not both ({' '.join(overrides)})")
        cfg = read_config(config_file) if config_file else compose(overrides)  # a sweep trial: the driver's config
        if not show_cfg:
            check_config(cfg)  # values, cross-field rules, files: before any data, tokenizer or model
    except ConfigError as err:
        return report_config_error(err)
    if show_cfg:
        print(OmegaConf.to_yaml(cfg))
        return 0
    from lightning_mim.orchestration.noise import filter_known_noise
    from lightning_mim.orchestration.stages import ensure_earlier_stages
    from lightning_mim.orchestration.training import run  # torch and Lightning: only for a checked config

    if stages_only:  # what a sweep with several workers does first, with all the cores
        absolutize_paths(cfg)
        filter_known_noise()
        ensure_earlier_stages(cfg, run)
        print(json.dumps({"tokenizer.ckpt": cfg.tokenizer.get("ckpt") if "tokenizer" in cfg else None}))
        return 0
    result = run(cfg)
    print(json.dumps(result["metrics"], indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
