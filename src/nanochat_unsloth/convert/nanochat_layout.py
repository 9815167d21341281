"""Our run checkpoints <-> nanochat's `base_checkpoints` layout: the one place that knows both.

nanochat's files per saved step (`<base>/base_checkpoints/<tag>/model_*.pt`, `optim_*.pt`, `meta_*.json`)
are described, and read, in `checkpoint/layouts.py`; our run checkpoint `<base>/runs/<tag>/step_000123/`
(Accelerate's save_state + meta.json) in `checkpoint/store.py`. The parameter names are already nanochat's
(our GPT mirrors its module tree), so converting the weights is only: strip wrapper prefixes, check
names/shapes against the config, order like nanochat's module tree, and set dtypes. Like torchtitan's
`state_dict_adapter.py`, every such rule lives here; the CLIs only move files.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch

from nanochat_unsloth.checkpoint.layouts import check_state_dict, load_torch_file, model_config_kwargs
from nanochat_unsloth.checkpoint.meta import RunMeta
from nanochat_unsloth.checkpoint.sharded import SHARDED_DIR, is_sharded_checkpoint, load_optimizer_state
from nanochat_unsloth.checkpoint.store import optimizer_file, strip_wrapper_prefixes
from nanochat_unsloth.common import UserError

EMBEDDING_KEY = "transformer.wte.weight"

# The keys nanochat's base_train writes into meta_XXXXXX.json, in its order. checkpoint_manager reads
# model_config; base_loss/base_eval/mid_train read device_batch_size, max_seq_len and user_config.
NANOCHAT_META_KEYS = ("step", "val_bpb", "model_config", "user_config", "device_batch_size", "max_seq_len")

# base_train.py's user settings with their defaults, in its order: `user_config` is exactly these.
NANOCHAT_USER_CONFIG_DEFAULTS = {
    "run": "dummy",
    "device_type": "",  # recorded before autodetection, so "" unless the user passed one
    "depth": 20,
    "max_seq_len": 2048,
    "num_iterations": -1,
    "target_flops": -1.0,
    "target_param_data_ratio": 20,
    "device_batch_size": 32,
    "total_batch_size": 524288,
    "embedding_lr": 0.2,
    "unembedding_lr": 0.004,
    "weight_decay": 0.0,
    "matrix_lr": 0.02,
    "grad_clip": 1.0,
    "warmup_ratio": 0.0,
    "warmdown_ratio": 0.2,
    "final_lr_frac": 0.0,
    "eval_every": 250,
    "eval_tokens": 20 * 524288,
    "core_metric_every": 2000,
    "core_metric_max_per_task": 500,
    "sample_every": 2000,
    "model_tag": "",
}



# -----------------------------------------------------------------------------
# Weights


def nanochat_embedding_dtype(meta: RunMeta, state: dict[str, torch.Tensor]) -> torch.dtype:
    """wte's dtype in the checkpoint nanochat itself would write on the run's device: its init_weights
    casts wte to bf16 on CUDA only, so bf16 there and fp32 on a CPU (or MPS) run.

    The run's device comes from the meta (`device_type`); checkpoints written before the meta recorded it
    hold wte in the dtype our model (which follows the same rule) trained it in.
    """
    device_type = meta.device_type
    if device_type is None:
        return strip_wrapper_prefixes(state)[EMBEDDING_KEY].dtype
    return torch.bfloat16 if device_type == "cuda" else torch.float32


def to_nanochat_state_dict(state: dict[str, torch.Tensor], model_config: dict, where: str = "checkpoint",
                           embedding_dtype: torch.dtype = torch.bfloat16) -> "OrderedDict[str, torch.Tensor]":
    """Our weights as nanochat's trainer leaves them: module order, wte in `embedding_dtype` (see
    `nanochat_embedding_dtype`), everything else fp32. A run's own dtypes are kept, so nothing is lost
    except where nanochat would have rounded too (an FSDP2 run's fp32 wte, bf16 on CUDA for nanochat).
    """
    ordered = check_state_dict(strip_wrapper_prefixes(state), model_config, where)
    out = OrderedDict()
    for name, tensor in ordered.items():
        dtype = embedding_dtype if name == EMBEDDING_KEY else torch.float32
        out[name] = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
    return out


# -----------------------------------------------------------------------------
# Meta / config


def user_config_from_train_config(train_config: dict) -> dict:
    """nanochat's `user_config` from our TrainConfig dict; the settings we lack keep nanochat's defaults."""
    return {k: train_config.get(k, default) for k, default in NANOCHAT_USER_CONFIG_DEFAULTS.items()}


def train_config_from_nanochat_meta(meta: dict, model_tag: str, defaults: dict) -> dict:
    """Our TrainConfig dict from a nanochat meta: user_config shares our names; ours-only fields keep our
    `defaults` (`TrainConfig().to_dict()`, every field in its order)."""
    user_config = meta.get("user_config") or {}
    known = {k: v for k, v in user_config.items() if k in defaults and k not in ("base_dir", "shards", "resume")}
    # the model shape comes from model_config and the batch from the top-level keys nanochat's scripts read
    model_config = model_config_kwargs(meta.get("model_config"))
    known["depth"] = model_config["n_layer"]
    known["max_seq_len"] = model_config["sequence_len"]
    if "device_batch_size" in meta:
        known["device_batch_size"] = int(meta["device_batch_size"])
    known["model_tag"] = model_tag
    return {**defaults, **known}


def nanochat_meta(run_meta: RunMeta, model_tag: str) -> dict:
    """meta_XXXXXX.json for one of our run checkpoints, with exactly nanochat's keys, in its order."""
    train_config = dict(run_meta.train_config or {})
    train_config.setdefault("model_tag", model_tag)
    model_config = model_config_kwargs(run_meta.model_config)
    user_config = user_config_from_train_config(train_config)
    meta = {
        "step": int(run_meta.step),
        "val_bpb": run_meta.val_bpb,
        "model_config": model_config,
        "user_config": user_config,
        "device_batch_size": user_config["device_batch_size"],
        "max_seq_len": model_config["sequence_len"],
    }
    assert tuple(meta) == NANOCHAT_META_KEYS
    return meta


def nanochat_meta_bytes(meta: dict) -> bytes:
    # nanochat writes json.dump(meta, f, indent=2): insertion order, no trailing newline
    return json.dumps(meta, indent=2).encode()


# -----------------------------------------------------------------------------
# Optimizer state


def nanochat_optim_from_run(step_dir: Path, meta: RunMeta | None = None) -> list[dict]:
    """[adamw.state_dict(), muon.state_dict()] from Accelerate's optimizer.bin / optimizer_1.bin, or from the
    shards of a sharded checkpoint (`meta`: its meta.json).

    Our build_optimizers returns [adamw, muon] like nanochat's setup_optimizers, and Accelerate saves them
    in that order. Muon's groups are sorted by shape, as nanochat's DistMuon (its multi-GPU Muon) groups them.
    """
    step_dir = Path(step_dir)
    if is_sharded_checkpoint(step_dir):
        return optim_from_sharded(step_dir, meta)
    states = []
    for path in (step_dir / optimizer_file(0), step_dir / optimizer_file(1)):  # AdamW, then Muon
        if not path.exists():
            raise UserError(f"{path}: not found, so the checkpoint has no optimizer state to export; drop --with-optim")
        state = load_torch_file(path, "the optimizer state", "it is corrupt")
        if not isinstance(state, dict) or "param_groups" not in state or "state" not in state:
            raise UserError(f"{path}: not an optimizer state_dict")
        states.append(state)
    if len(states[0]["param_groups"]) != 2:
        raise UserError(f"{step_dir / optimizer_file(0)}: expected AdamW's 2 groups (lm_head, wte), "
                        f"found {len(states[0]['param_groups'])}")
    return states


def optim_from_sharded(step_dir: Path, meta: RunMeta) -> list[dict]:
    """[adamw.state_dict(), muon.state_dict()] from a sharded (FSDP2) checkpoint, whole. DCP keeps the
    optimizers' states keyed by parameter name and their groups one after another (AdamW's 2, then Muon's);
    torch's layout numbers each parameter by its place in its own optimizer's groups. The values stay as saved:
    an FSDP2 run's parameters, and so their moments, are fp32, as a one-process resume would hold them."""
    where = Path(step_dir) / SHARDED_DIR
    name = meta.train_config.get("optimizer", "muon")
    if name != "muon":
        raise UserError(f"{where}: --with-optim exports nanochat's AdamW + Muon state, and this run trained with "
                        f"--optimizer {name}; drop --with-optim")
    saved = load_optimizer_state(step_dir)
    groups = saved["param_groups"]
    adamw, muon = groups[:2], groups[2:]
    if [group["params"] for group in adamw] != [["lm_head.weight"], [EMBEDDING_KEY]] or not muon:
        raise UserError(f"{where}: expected AdamW's 2 groups (lm_head, wte) and then Muon's, found groups of "
                        f"{[group['params'][:1] for group in groups]}")
    return [numbered_optimizer_state(saved["state"], adamw), numbered_optimizer_state(saved["state"], muon)]


def numbered_optimizer_state(states: dict[str, dict], groups: list[dict]) -> dict:
    """One optimizer's state_dict() from its parameters' states by name and its groups (params by name):
    each parameter is numbered by its place in the groups, as torch's Optimizer.state_dict numbers them."""
    names = [name for group in groups for name in group["params"]]
    number = {name: i for i, name in enumerate(names)}
    return {"state": {number[name]: states[name] for name in names if name in states},
            "param_groups": [{**{k: v for k, v in group.items() if k != "params"},
                              "params": [number[name] for name in group["params"]]} for group in groups]}
