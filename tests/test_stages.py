"""The stage cache's keys: the tokenizer a stage-2 run trains is keyed by what the tokenizer computes."""

from __future__ import annotations

import copy

import pytest
from omegaconf import OmegaConf

from lightning_mim.orchestration.config import NON_SEMANTIC_KEYS, compose, flatten
from lightning_mim.orchestration.stages import stage_key, tokenizer_run_config

# What the tokenizer depends on, said independently of how stages.py derives it: the images (the data
# section, except how the stage-2 run batches, loads and seeds them), its own section (except the
# checkpoint it would produce), and where it runs. Nothing of the stage-2 model, its schedule, decoding,
# evaluation, optimiser or budget, nor the run's seed.
DATA_LOADING = {"batch_size", "val_batch_size", "num_workers", "batches_per_epoch", "val_batches", "shuffle_buffer", "seed"}


def tokenizer_depends_on(key: str) -> bool:
    section, _, rest = key.partition(".")
    if section == "data":
        return rest.split(".")[0] not in DATA_LOADING
    if section == "tokenizer":
        return rest != "ckpt"
    return key in ("trainer.accelerator", "trainer.devices", "trainer.precision")


def _changed(name, value):
    if name == "tokenizer.train_experiment":
        return "digits_maskgit"  # another recipe (a name that is no experiment does not compose)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 1.5 + 0.1
    if isinstance(value, list):
        return [*value, value[-1]] if value else [1]
    if value is None:
        return 1
    return f"{value}x"


@pytest.mark.parametrize("experiment", ["digits_maskgit", "digits_mage"])
def test_the_tokenizer_key_changes_with_every_setting_it_depends_on_and_no_other(experiment):
    cfg = compose([f"experiment={experiment}", "paths.home=/tmp/lmim-key-test"])
    key = stage_key(tokenizer_run_config(cfg))
    leaves = {k: v for k, v in flatten(OmegaConf.to_container(cfg, resolve=False)).items()
              if k.split(".")[0] not in NON_SEMANTIC_KEYS and "_target_" not in k}
    assert len(leaves) > 80 and any(k.startswith("data.") for k in leaves)
    wrong = []
    for name, value in sorted(leaves.items()):
        changed = copy.deepcopy(cfg)
        OmegaConf.update(changed, name, _changed(name, value), merge=False)
        if (stage_key(tokenizer_run_config(changed)) != key) != tokenizer_depends_on(name):
            wrong.append(name)
    assert wrong == []


def test_a_stage2_override_of_how_data_is_batched_shares_the_tokenizer_and_the_images_do_not():
    base = stage_key(tokenizer_run_config(compose(["paths.home=/tmp/lmim-key-test"])))
    assert stage_key(tokenizer_run_config(compose(["paths.home=/tmp/lmim-key-test", "data.batch_size=8", "seed=3"]))) == base
    assert stage_key(tokenizer_run_config(compose(["paths.home=/tmp/lmim-key-test", "data.resolution=64"]))) != base
    assert stage_key(tokenizer_run_config(compose(["paths.home=/tmp/elsewhere"]))) == base  # the home is not in the key
