"""`hf`: a Hugging Face causal language model from a local folder (`model.path`: config.json and safetensors
weights) or from a config without weights (`model.arch=llama model.config={...}`), through the optional extra
`modrun[hf]` (transformers). Nothing is downloaded (local files only), no remote code runs, and only safetensors
weights are read, so a model folder from someone else cannot execute anything."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modrun.core.errors import UserError, did_you_mean

# where the decoder blocks and the final norm live in the usual architectures (Llama, Mistral, Qwen, GPT-2, ...)
BLOCKS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")
FINAL_NORMS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.decoder.final_layer_norm")


class HFCausalLM(nn.Module):
    """tokens (B, T) -> logits (B, T, vocab), like `gpt`; its blocks and final norm named for feature KD.

    A model whose embedding is padded past the tokenizer's vocabulary (to a multiple of 64, say) gives logits
    over the data's `vocab` tokens only: the padding rows are no token of the data, and a softmax over them
    would take probability mass (and a teacher's KD targets) away from real tokens."""

    def __init__(self, model: nn.Module, vocab: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.vocab = vocab
        names = dict(model.named_modules())
        blocks = next((p for p in BLOCKS if isinstance(names.get(p), nn.ModuleList)), None)
        self.feature_layers = tuple(f"model.{blocks}.{i}" for i in range(len(names[blocks]))) if blocks else ()
        norm = next((p for p in FINAL_NORMS if p in names), None)
        self.embedding_layer = f"model.{norm}" if norm else None

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=idx, use_cache=False).logits
        return logits if self.vocab is None else logits[..., : self.vocab]


def _transformers() -> Any:
    try:
        import transformers  # the optional extra: only `model=hf` needs it
    except ImportError:
        raise UserError("model=hf needs the transformers package: pip install 'modrun[hf]'") from None
    transformers.utils.logging.set_verbosity_error()  # modrun's log says what happens; no bars of its own
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _read_config(path: Path) -> dict[str, Any]:
    if not (path / "config.json").is_file():
        raise UserError(f"model.path: {path} is not a Hugging Face model folder (no config.json)")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"model.path: {path}/config.json is not JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise UserError(f"model.path: {path}/config.json names no model_type")
    return config


def hf(
    vocab_size: int,
    path: str | None = None,
    arch: str | None = None,
    config: dict[str, Any] | None = None,
) -> nn.Module:
    """A causal LM: the folder's weights (`path`), or a fresh model of `arch` with `config`'s fields."""
    tf = _transformers()
    if (path is None) == (arch is None):
        raise UserError("model=hf: give model.path (a local model folder) or model.arch (a config without weights)")
    on_meta = torch.empty(0).device.type == "meta"  # validation builds models without memory: config only
    if path is not None:
        folder = Path(path).expanduser()
        fields = _read_config(folder)
        cfg = tf.AutoConfig.for_model(fields.pop("model_type"), **{**fields, **(config or {})})
        has_weights = any(folder.glob("*.safetensors"))
        if not has_weights and not on_meta:
            raise UserError(f"model.path: {folder} holds no *.safetensors weights (only safetensors are read)")
    else:  # a fresh model reads the data's vocabulary unless model.config says otherwise
        known = list(tf.CONFIG_MAPPING.keys())
        if str(arch) not in known:
            raise UserError(f"model.arch={arch}: not a transformers model type{did_you_mean(str(arch), known)}")
        cfg = tf.AutoConfig.for_model(str(arch), **{"vocab_size": vocab_size, **(config or {})})
    if int(cfg.vocab_size) < int(vocab_size):  # larger is a padded embedding: its logits are sliced
        raise UserError(
            f"model=hf: the model's vocabulary has {cfg.vocab_size} tokens, fewer than the data's {vocab_size}; "
            "use data with the model's tokenizer or set model.config.vocab_size"
        )
    if path is not None and not on_meta:
        model = tf.AutoModelForCausalLM.from_pretrained(
            folder, config=cfg, local_files_only=True, use_safetensors=True, trust_remote_code=False
        )
    else:
        model = tf.AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)
    return HFCausalLM(model, int(vocab_size) if int(cfg.vocab_size) > int(vocab_size) else None)


hf.requires = ("transformers", "modrun[hf]")  # said as one line by validation when the extra is missing
hf.task = "language_modeling"
