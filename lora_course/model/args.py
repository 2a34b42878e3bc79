"""ModelArgs: the numbers that define a Llama / Mistral model, read from its config.

One dataclass holds every size and switch of the architecture. ``from_dict`` reads a
Hugging Face ``config.json``, a Meta ``params.json`` or our own saved dict, and
ignores keys it does not know. Taught in notebook 03 (attention) and the notebook
that assembles the whole model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from lora_course import limits

# Integer fields that size an allocation: (lowest, highest, the config.json key that sets it).
BOUNDS = {
    "dim": (1, limits.MAX_DIM, "hidden_size"),
    "n_layers": (1, limits.MAX_LAYERS, "num_hidden_layers"),
    "hidden_dim": (1, limits.MAX_HIDDEN_DIM, "intermediate_size"),
    "n_heads": (1, limits.MAX_HEADS, "num_attention_heads"),
    "n_kv_heads": (1, limits.MAX_HEADS, "num_key_value_heads"),
    "head_dim": (2, limits.MAX_HEAD_DIM, "head_dim"),
    "vocab_size": (1, limits.MAX_VOCAB, "vocab_size"),
    "max_position_embeddings": (1, limits.MAX_POSITIONS, "max_position_embeddings"),
}

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# rope_type -> the rope_scaling keys it needs (each a positive number)
ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}

# Meta's params.json says only "use_scaled_rope": true; these are the constants of Meta's code
# (the factor may be given as "rope_scaling_factor").
META_SCALED_ROPE = {
    "rope_type": "llama3",
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@dataclass
class ModelArgs:
    dim: int = 4096  # width of the residual stream (HF: hidden_size)
    n_layers: int = 32  # number of transformer blocks (HF: num_hidden_layers)
    head_dim: int | None = None  # width of one attention head; None means dim // n_heads
    hidden_dim: int = 11008  # inner width of the SwiGLU feed-forward (HF: intermediate_size)
    n_heads: int = 32  # query heads (HF: num_attention_heads)
    n_kv_heads: int | None = None  # key/value heads; fewer than n_heads is GQA; None means n_heads
    norm_eps: float = 1e-5  # epsilon inside RMSNorm (HF: rms_norm_eps)
    vocab_size: int = 32000  # number of token ids
    rope_theta: float = 10000.0  # RoPE base: wavelengths grow as theta^(2i/d)
    rope_traditional: bool = False  # True: rotate interleaved pairs (Meta); False: halves (HF)
    # None, {"rope_type": "linear", "factor": f} (positions divided by f) or Llama 3.1's
    # {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    #  "original_max_position_embeddings"} (slow frequencies divided by f; see rope.py)
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False  # reuse embed_tokens as the output head
    attention_bias: bool = False  # biases on q/k/v/o projections (some fine-tunes use them)
    qkv_bias: bool = False  # biases on q/k/v only, not o (Qwen2)
    sliding_window: int | None = None  # Mistral: each query sees only the last W keys (itself included)
    mlp_bias: bool = False  # biases on gate/up/down projections
    max_position_embeddings: int = 4096  # context length the model was trained for
    model_type: str = "llama"  # "llama", "mistral" or "qwen2": one architecture, switched by the fields above
    quantization: dict | None = None  # {"group_size": g, "bits": b} once quantized

    def __post_init__(self):
        for name in ("dim", "n_heads"):  # head_dim below divides by them
            _check_bound(name, getattr(self, name))
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        check_model_args(self)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelArgs: n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
            )
        kind = self.rope_type
        if kind not in ROPE_KEYS:
            raise ValueError(
                f"rope_scaling: rope_type {kind!r} is not supported (lora_course reads "
                f"{', '.join(ROPE_KEYS)})"
            )
        for key in ROPE_KEYS[kind]:
            value = self.rope_scaling.get(key)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and value > 0):
                raise ValueError(f"rope_scaling of type {kind} needs a positive {key!r}, got {value!r}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be a positive integer or null, got {self.sliding_window}")

    @property
    def rope_type(self) -> str:
        """ "default", "linear" or "llama3" (HF spells the key "rope_type", older files "type")."""
        scaling = self.rope_scaling or {}
        return scaling.get("rope_type", scaling.get("type")) or "default"

    # HF config.json and Meta params.json spell some fields differently.
    _ALIASES = {
        "hidden_size": "dim",
        "num_hidden_layers": "n_layers",
        "intermediate_size": "hidden_dim",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "rms_norm_eps": "norm_eps",
    }

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelArgs:
        """Build from an HF ``config.json`` dict, a Meta ``params.json`` dict, or our own
        ``asdict``. Unknown keys are ignored."""
        config = dict(config)
        # transformers 5 writes {"rope_theta", "rope_type", ...} under rope_parameters; older
        # files have a top-level rope_theta and rope_scaling. The newer place wins.
        rope = config.get("rope_parameters") or {}
        if "rope_theta" in rope:
            config["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", rope.get("type")) is not None:
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
            config["rope_scaling"] = None if scaling.get("rope_type") == "default" else scaling
        kind = config.get("model_type")
        if kind == "qwen2":
            config.setdefault("qkv_bias", True)  # Qwen2 always has q/k/v biases, and no o bias
            if not config.get("use_sliding_window"):
                config["sliding_window"] = None  # Qwen2 configs carry a window they do not use
        elif kind == "mistral":
            config.setdefault("sliding_window", 4096)  # transformers' MistralConfig default
        elif kind is not None:
            config["sliding_window"] = None  # Llama has no window, whatever else the file holds
        known = {f.name for f in fields(cls)}
        kwargs = {}
        for key, value in config.items():
            name = cls._ALIASES.get(key, key)
            if name in known and value is not None and not (name == "vocab_size" and value == -1):
                kwargs[name] = value  # (Llama 1/2 params.json: vocab_size -1, read from the weights)
        if "hidden_dim" not in kwargs and "multiple_of" in config and "dim" in kwargs:
            kwargs["hidden_dim"] = _meta_hidden_dim(
                kwargs["dim"], config["multiple_of"], config.get("ffn_dim_multiplier")
            )
        if "model_type" not in config and "dim" in config and "n_layers" in config:
            # A Meta params.json: its weights rotate interleaved pairs.
            kwargs.setdefault("rope_traditional", True)
            if config.get("use_scaled_rope") and "rope_scaling" not in kwargs:  # Llama 3.1+ originals
                kwargs["rope_scaling"] = dict(
                    META_SCALED_ROPE, factor=config.get("rope_scaling_factor") or 8.0
                )
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """The equivalent Hugging Face ``config.json`` (Llama / Mistral / Qwen2 ForCausalLM).

        RoPE settings go in both places: ``rope_parameters`` (transformers 5) and the older
        top-level ``rope_theta`` / ``rope_scaling`` (transformers 4, mlx-lm)."""
        scaling = {k: v for k, v in (self.rope_scaling or {}).items() if k not in ("type", "rope_type")}
        d = {
            "architectures": [ARCHITECTURES.get(self.model_type, "LlamaForCausalLM")],
            "model_type": self.model_type,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "intermediate_size": self.hidden_dim,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.norm_eps,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": self.rope_type, **scaling},
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
        }
        if self.model_type in ("mistral", "qwen2"):
            d["sliding_window"] = self.sliding_window  # written even when null: Mistral defaults to 4096
        if self.model_type == "qwen2":
            d["use_sliding_window"] = self.sliding_window is not None
            del d["attention_bias"], d["mlp_bias"]  # fixed by the architecture
        if self.quantization:
            d["quantization"] = dict(self.quantization)
        return d


def _check_bound(name: str, value) -> None:
    low, high, key = BOUNDS[name]
    why = limits.int_in_range(value, f"{name} ({key})", low, high)
    if why:
        raise ValueError(f"ModelArgs: {why}")


def check_model_args(args: ModelArgs) -> None:
    """Types and ranges of every field (bounds in ``lora_course.limits``): a ValueError
    naming the field and its config.json key. Run on every ModelArgs; a loader of another
    format (GGUF) gets the same checks by building a ModelArgs."""
    for name in BOUNDS:
        _check_bound(name, getattr(args, name))
    for name in ("norm_eps", "rope_theta"):
        value = getattr(args, name)
        if not (limits.is_number(value) and value > 0):
            raise ValueError(f"ModelArgs: {name} must be a positive finite number, got {repr(value)[:60]}")
    for name in ("rope_traditional", "tie_word_embeddings", "attention_bias", "mlp_bias"):
        if not isinstance(getattr(args, name), bool):
            raise ValueError(f"ModelArgs: {name} must be true or false, got {getattr(args, name)!r}")
    for name in ("rope_scaling", "quantization"):
        if getattr(args, name) is not None and not isinstance(getattr(args, name), dict):
            raise ValueError(f"ModelArgs: {name} must be an object or null, got {getattr(args, name)!r}")
    if args.head_dim % 2:
        raise ValueError(f"ModelArgs: head_dim={args.head_dim} must be even (RoPE rotates pairs)")


def parameter_bytes(args: ModelArgs) -> float:
    """About how many bytes the weights take: 2 per parameter (16-bit floats), or
    ``bits / 8`` plus the scales when quantized."""
    attn = args.dim * args.head_dim * (2 * args.n_heads + 2 * args.n_kv_heads)
    block = attn + 3 * args.dim * args.hidden_dim + 2 * args.dim
    embed = args.vocab_size * args.dim * (1 if args.tie_word_embeddings else 2)
    params = args.n_layers * block + embed + args.dim
    q = args.quantization or {}
    bits, group = q.get("bits"), q.get("group_size")
    if limits.is_int(bits) and limits.is_int(group) and bits > 0 and group > 0:
        return params * (bits / 8 + 4 / group)
    return params * 2.0


def memory_problem(args: ModelArgs) -> str | None:
    """Why this model cannot fit in this machine's memory (None: it may)."""
    n = math.ceil(parameter_bytes(args))
    return limits.memory_problem(n, f"a {args.n_layers}-layer model of width {args.dim}")


def _meta_hidden_dim(dim: int, multiple_of: int, multiplier: float | None) -> int:
    # Meta's params.json gives the FFN width as a recipe, not a number.
    hidden = int(2 * (4 * dim) / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)
