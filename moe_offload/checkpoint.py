"""Hugging Face checkpoint folders: config.json, safetensors shards (lazy, never pickle), strict keys.

Backbone tensors keep their checkpoint names (our modules are named like transformers'); routed experts
are mapped to (layer, expert, part) with part in gate / up / down by the tables each family's file holds
(models/<model_type>.py, collected below).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import MoeError
from .models import family_table
from .models.layouts import FP4_VALUES, PARTS, dequantize_mxfp4  # noqa: F401  (checkpoint's public names)

# model_type: (name of one routed expert's tensor, our part -> checkpoint part), from each family's file
EXPERT_NAMES: dict[str, tuple[str, dict[str, str]]] = family_table("EXPERT_NAMES")


def expert_key(model_type: str, layer: int, expert: int, part: str) -> str:
    template, parts = EXPERT_NAMES[model_type]
    return template.format(layer=layer, expert=expert, part=parts[part])


def parse_expert_key(model_type: str, name: str) -> tuple[int, int, str] | None:
    """Checkpoint name -> (layer, expert, part), or None for a backbone tensor."""
    template, parts = EXPERT_NAMES[model_type]
    pattern = re.escape(template).replace(r"\{layer\}", r"(\d+)").replace(r"\{expert\}", r"(\d+)")
    pattern = pattern.replace(r"\{part\}", "(" + "|".join(map(re.escape, parts.values())) + ")")
    m = re.fullmatch(pattern, name)
    if not m:
        return None
    ours = {v: k for k, v in parts.items()}
    return int(m.group(1)), int(m.group(2)), ours[m.group(3)]


# ---- config.json: what each family needs, checked before anything is built --------------------------------
# model_type: (keys config.json must hold besides BASE_KEYS, "a|b" for either spelling; the expert count's key
# is the second), one MoE layer's router weight [E, D] (its rows must equal the expert count); from each
# family's file
BASE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts_per_tok")
FAMILY_KEYS: dict[str, tuple[tuple[str, ...], str]] = family_table("CONFIG_KEYS")
# Upper bounds of counts in config.json: far above any released model, far below what exhausts memory before
# the checkpoint's own tensors can contradict them.
LIMITS = {"num_hidden_layers": 1024, "hidden_size": 1 << 17, "vocab_size": 1 << 22,
          "num_attention_heads": 1 << 12, "num_key_value_heads": 1 << 12, "head_dim": 1 << 12,
          "intermediate_size": 1 << 20,
          "moe_intermediate_size": 1 << 20, "num_local_experts": 1 << 14, "num_experts": 1 << 14,
          "n_routed_experts": 1 << 14, "num_experts_per_tok": 1 << 14, "max_position_embeddings": 1 << 24}
MAX_JSON_BYTES = 64 << 20  # config.json, tokenizer_config.json, manifest.json: megabytes at most in practice


def read_json(path: Path) -> dict:
    """A JSON object from a file we were handed: one line naming the file if it is too big, not JSON, not an
    object."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise MoeError(f"{path}: {size} bytes, more than the {MAX_JSON_BYTES >> 20} MiB a JSON file here "
                           f"may have")
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise MoeError(f"{path}: not valid JSON ({str(e)[:200]})") from None
    except OSError as e:
        raise MoeError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise MoeError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def config_value(config: dict, key: str):
    """The value of `key` ("a|b": the first spelling present), or None."""
    return next((config[k] for k in key.split("|") if k in config), None)


def check_config(config: dict, where: str) -> None:
    """The family's required keys present, counts integers within LIMITS: one line naming the key."""
    mt = config.get("model_type")
    family = FAMILY_KEYS.get(mt) if isinstance(mt, str) else None
    if family is None:
        return  # an unsupported type gets its own error from models.get_module
    for key in BASE_KEYS + family[0]:
        if config_value(config, key) is None:
            raise MoeError(f"{where}: {' or '.join(key.split('|'))} is missing (a {config['model_type']} "
                           f"config needs it)")
    for key, limit in LIMITS.items():
        v = config.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int):
            raise MoeError(f"{where}: {key} must be an integer, got {v!r:.40}")
        if not 1 <= v <= limit:
            raise MoeError(f"{where}: {key} {v} is out of range (1..{limit})")


def check_config_tensors(config: dict, source, where: str) -> None:
    """config.json against the tensors a checkpoint holds (headers only): the embedding [V, D], the last layer
    present, the router's rows. One line naming the key."""
    mt = config.get("model_type")
    family = FAMILY_KEYS.get(mt) if isinstance(mt, str) else None
    if family is None:
        return
    keys = set(source.keys())
    V, D, L = config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]
    if "model.embed_tokens.weight" in keys:
        rows, cols = (source.shape_of("model.embed_tokens.weight") + [0, 0])[:2]
        for key, want, got in (("hidden_size", D, cols), ("vocab_size", V, rows)):
            if want != got:
                raise MoeError(f"{where}: {key} is {want} but model.embed_tokens.weight is {rows}×{cols}")
    layers = {int(m.group(1)) for k in keys if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    if layers and L - 1 not in layers:
        raise MoeError(f"{where}: num_hidden_layers is {L} but the checkpoint holds layers 0..{max(layers)}")
    E = config_value(config, family[0][1])
    for layer in range(L):
        name = family[1].format(layer=layer)
        if name in keys:
            rows = source.shape_of(name)[0]
            if rows != E:
                key = family[0][1].split("|")[0]
                raise MoeError(f"{where}: {key} is {E} but the router {name} has {rows} rows")
            break


def read_config(folder: Path) -> dict:
    """config.json, checked: a JSON object with the family's keys and counts in bounds (check_config)."""
    path = folder / "config.json"
    if not path.is_file():
        raise MoeError(f"{folder}: no config.json (not a Hugging Face model folder or expert store)")
    config = read_json(model_file(folder, "config.json"))
    check_config(config, str(path))
    return config


def model_root(folder: Path) -> Path:
    """The folder files of a model may live in: the folder itself, or for a Hugging Face cache snapshot
    (models--org--name/snapshots/REV, whose files link to ../../blobs) the repository's cache folder."""
    real = folder.resolve()
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return real.parent.parent
    return real


def model_file(folder: Path, name: str, what: str = "", resolve: bool = False) -> Path:
    """folder/name, refused in one line when the name leads outside the folder ("../x", "/x"); with `resolve`,
    also when a symlink does (files copied into a store). Weights may be symlinks (Hugging Face cache, shared
    shards): they are only parsed as safetensors, never copied as they are."""
    path = folder / name
    norm = os.path.normpath(name)
    if not name or os.path.isabs(name) or norm == ".." or norm.startswith(".." + os.sep) or "\0" in name:
        raise MoeError(f"{what or path}: file name {name!r:.80} leads outside the model folder; refused")
    if resolve:
        real, root = path.resolve(), model_root(folder)
        if root not in real.parents:
            raise MoeError(f"{path}: a symlink to {real}, outside the model folder; refused (copy the file "
                           "into the folder if it belongs to the model)")
    return path


PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")  # weights in pickle form: never opened


class SafetensorsFolder:
    """Lazy access to all tensors of a folder, one shard handle each, opened on first use."""

    def __init__(self, folder: str | Path, index_name: str = "model.safetensors.index.json",
                 single_name: str = "model.safetensors"):
        self.folder = Path(folder)
        index = self.folder / index_name
        if index.is_file():
            weight_map = read_json(model_file(self.folder, index_name)).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise MoeError(f"{index}: bad index file (weight_map must map tensor names to file names)")
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                model_file(self.folder, shard, str(index))
        elif (self.folder / single_name).is_file():
            shards, weight_map = [single_name], None
            model_file(self.folder, single_name)
        elif pickles := sorted(p.name for g in PICKLES for p in self.folder.glob(g)):
            raise MoeError(f"{self.folder}: only safetensors weights are read, never pickle files such as "
                           f"{pickles[0]} (loading them can run code); convert once with transformers: "
                           "AutoModelForCausalLM.from_pretrained(F).save_pretrained(F, "
                           "safe_serialization=True)")
        else:
            raise MoeError(f"{self.folder}: no {single_name} or {index_name}")
        self._handles = {}
        self.key_to_shard: dict[str, str] = {}
        for shard in shards:
            keys = self._open(shard).keys()
            for k in keys:
                self.key_to_shard[k] = shard
        if weight_map is not None:
            missing = [k for k, s in weight_map.items() if self.key_to_shard.get(k) != s]
            if missing:
                raise MoeError(f"{index}: {len(missing)} tensors listed but not in their shard, e.g. {missing[0]}")

    def _open(self, shard: str):
        if shard not in self._handles:
            path = self.folder / shard
            if not path.is_file():
                raise MoeError(f"{path}: shard is missing")
            try:
                self._handles[shard] = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error type for bad headers / short files
                raise MoeError(f"{path}: corrupt or truncated safetensors file ({e})") from None
        return self._handles[shard]

    def keys(self) -> list[str]:
        return list(self.key_to_shard)

    def get(self, name: str) -> torch.Tensor:
        shard = self.key_to_shard[name]
        try:
            return self._open(shard).get_tensor(name)
        except Exception as e:
            raise MoeError(f"{self.folder / shard}: cannot read tensor {name} ({e})") from None

    def dtype_of(self, name: str) -> str:
        """The safetensors dtype name ("F32", "BF16", "F8_E4M3", ...) without reading the tensor."""
        return self._open(self.key_to_shard[name]).get_slice(name).get_dtype()

    def shape_of(self, name: str) -> list[int]:
        return list(self._open(self.key_to_shard[name]).get_slice(name).get_shape())

    def get_index(self, name: str, index: int) -> torch.Tensor:
        """`get(name)[index]`, reading only that slab (one expert of a stacked [E, ...] tensor)."""
        shard = self.key_to_shard[name]
        try:
            return self._open(shard).get_slice(name)[index]
        except Exception as e:
            raise MoeError(f"{self.folder / shard}: cannot read tensor {name}[{index}] ({e})") from None


def check_keys(have: set[str], want: set[str], where: str, ignore: set[str] = frozenset()) -> None:
    """Strict loading: a missing or unexpected tensor is an error naming it."""
    missing, unexpected = sorted(want - have), sorted(have - want - ignore)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensor(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]}")
        raise MoeError(f"{where}: " + "; ".join(parts))


def checkpoint_dtype(config: dict) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else torch.float32


# ---- stacked experts: checkpoints holding all experts of a layer in one tensor [E, ...] ----------------------
# One expert is still the unit: `expert_tensors` cuts expert e out of the stacked tensors by the rules of the
# family's table (models/layouts.py): alternative layouts, the first whose tensors the checkpoint has is used.
STACKED_EXPERT_NAMES: dict[str, list[dict[str, tuple[tuple[str, ...], object]]]] = family_table(
    "STACKED_EXPERT_NAMES")


def _stacked_layout(model_type: str, layer: int, keys) -> dict:
    """The first layout whose tensors are all in `keys` (else the first, so a strict check names what is missing)."""
    layouts = STACKED_EXPERT_NAMES[model_type]
    if keys is not None:
        for layout in layouts:
            if all(n.format(layer=layer) in keys for names, _ in layout.values() for n in names):
                return layout
    return layouts[0]


def expert_checkpoint_keys(model_type: str, layer: int, n_experts: int, keys=None) -> set[str]:
    """Checkpoint names holding the routed experts of one layer (per-expert or stacked). `keys`: the
    checkpoint's names, to pick among alternative stacked layouts."""
    if model_type in EXPERT_NAMES:
        return {expert_key(model_type, layer, e, p) for e in range(n_experts) for p in PARTS}
    layout = _stacked_layout(model_type, layer, keys)
    return {n.format(layer=layer) for names, _ in layout.values() for n in names}


def expert_tensors(source, model_type: str, layer: int, expert: int) -> dict[str, torch.Tensor]:
    """One routed expert as our parts {gate, up, down[, gate_bias, up_bias, down_bias]}, from any source with
    keys()/get() (a stacked tensor is read one expert's slab at a time where the source has get_index)."""
    if model_type in EXPERT_NAMES:
        return {p: source.get(expert_key(model_type, layer, expert, p)) for p in PARTS}
    keys = getattr(source, "key_to_shard", None)
    layout = _stacked_layout(model_type, layer, keys if keys is not None else set(source.keys()))
    slabs: dict[str, torch.Tensor] = {}

    def slab(name: str) -> torch.Tensor:
        if name not in slabs:
            get_index = getattr(source, "get_index", None)
            slabs[name] = get_index(name, expert) if get_index else source.get(name)[expert]
        return slabs[name]

    return {part: rule(*(slab(n.format(layer=layer)) for n in names)).contiguous()
            for part, (names, rule) in layout.items()}


# ---- FP8 block-scaled checkpoints (DeepSeek-V3/R1): `X.weight` float8_e4m3fn + `X.weight_scale_inv` [ceil(O/bo),
# ceil(I/bi)] fp32, one scale per bo×bi block; dequantised at load time: weight = fp8 · scale_inv (per block).


def fp8_block_size(config: dict) -> tuple[int, int] | None:
    """(bo, bi) for an FP8 block-quantized checkpoint (`quantization_config.quant_method == "fp8"`), else None."""
    q = config.get("quantization_config") or {}
    if q.get("quant_method") != "fp8":
        return None
    return tuple(q.get("weight_block_size") or (128, 128))


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """weight [O, I] (float8) × scale_inv [ceil(O/bo), ceil(I/bi)] broadcast over its blocks -> [O, I] fp32."""
    O, I = weight.shape
    scale = scale_inv.float()
    if scale.numel() > 1:
        scale = scale.repeat_interleave(block[0], dim=0)[:O].repeat_interleave(block[1], dim=1)[:, :I]
    return weight.float() * scale


class Fp8Dequantized:
    """A source (keys()/get()) over another whose float8 weights carry `<name>_scale_inv` block scales: the
    scale tensors are hidden and those weights come out dequantised (fp32)."""

    def __init__(self, source, block: tuple[int, int]):
        self.source, self.block = source, tuple(block)
        self.folder = getattr(source, "folder", "checkpoint")
        keys = source.keys()
        self.scales = {k[: -len("_scale_inv")]: k for k in keys if k.endswith(".weight_scale_inv")}
        self._keys = [k for k in keys if not k.endswith(".weight_scale_inv")]

    def keys(self) -> list[str]:
        return list(self._keys)

    def get(self, name: str) -> torch.Tensor:
        t = self.source.get(name)
        if name in self.scales:
            return dequantize_fp8_blocks(t, self.source.get(self.scales[name]), self.block)
        return t

    def dtype_of(self, name: str) -> str:
        return "F32" if name in self.scales else self.source.dtype_of(name)

    def shape_of(self, name: str) -> list[int]:
        return self.source.shape_of(name)  # dequantising keeps the shape


def dequantizing(source, config: dict):
    """`source` itself, or a view that dequantises it when config.json declares a format loaded that way;
    first checked against the config (check_config_tensors), since every HF folder that is loaded passes
    here."""
    check_config_tensors(config, source, f"{getattr(source, 'folder', 'checkpoint')}/config.json")
    block = fp8_block_size(config)
    return Fp8Dequantized(source, block) if block else source
