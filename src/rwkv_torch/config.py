"""RWKVConfig: one frozen, validated dataclass for every version; derived sizes are properties."""

import dataclasses
import math
from dataclasses import dataclass

VERSIONS = (4, 5, 6, 7)


def _lora_dim(factor: float, C: int) -> int:
    # The RWKV-7 training code's suggestion (spec 4.1): max(32, round(factor * sqrt(C) / 32) * 32).
    return max(32, int(round(factor * math.sqrt(C) / 32)) * 32)


@dataclass(frozen=True)
class RWKVConfig:
    """Sizes and options of an RWKV model.

    Exactly one of ``vocab_size`` (token model with an LM head) and ``embed_dim`` (continuous backbone: a
    linear input projection, ``[B, T, embed_dim]`` frames) is set. ``output_dim`` adds a linear head on top of a
    continuous backbone. LoRA ranks left at None take the RWKV-7 training code's defaults for ``hidden_size``.
    """

    version: int = 7
    hidden_size: int = 256
    num_layers: int = 6
    head_size: int = 64
    vocab_size: int | None = None
    embed_dim: int | None = None
    output_dim: int | None = None
    ffn_size: int | None = None
    decay_lora: int | None = None
    a_lora: int | None = None
    v_lora: int | None = None
    gate_lora: int | None = None
    mix_lora: int | None = None
    dropout: float = 0.0
    window_size: int = 60  # not read by the model: Edifice's option, kept so its configs and ours round-trip

    def __post_init__(self):
        def bad(field, rule):
            raise ValueError(f"RWKVConfig.{field}={getattr(self, field)!r}: {rule}")

        if self.version not in VERSIONS:
            bad("version", f"must be one of {VERSIONS}")
        for f in ("hidden_size", "num_layers", "head_size", "window_size"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(f, "must be a positive int")
        for f in ("vocab_size", "embed_dim", "output_dim", "ffn_size", "decay_lora", "a_lora", "v_lora",
                  "gate_lora", "mix_lora"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                bad(f, "must be None or a positive int")
        if (self.vocab_size is None) == (self.embed_dim is None):
            raise ValueError(
                f"RWKVConfig: set exactly one of vocab_size (token model) and embed_dim (continuous input); "
                f"got vocab_size={self.vocab_size!r}, embed_dim={self.embed_dim!r}"
            )
        if self.output_dim is not None and self.vocab_size is not None:
            bad("output_dim", "applies to continuous backbones (embed_dim); a token model's head has vocab_size")
        if self.version != 4 and self.hidden_size % self.head_size != 0:
            bad("head_size", f"must divide hidden_size={self.hidden_size}")
        if not (0.0 <= float(self.dropout) < 1.0):
            bad("dropout", "must be in [0, 1)")

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.head_size

    @property
    def ffn_dim(self) -> int:
        if self.ffn_size is not None:
            return self.ffn_size
        if self.version in (5, 6):
            return int(3.5 * self.hidden_size) // 32 * 32
        return 4 * self.hidden_size

    @property
    def decay_lora_dim(self) -> int:
        if self.decay_lora is not None:
            return self.decay_lora
        return 64 if self.version in (5, 6) else _lora_dim(2.5, self.hidden_size)

    @property
    def a_lora_dim(self) -> int:
        return self.a_lora if self.a_lora is not None else _lora_dim(2.5, self.hidden_size)

    @property
    def v_lora_dim(self) -> int:
        return self.v_lora if self.v_lora is not None else _lora_dim(1.7, self.hidden_size)

    @property
    def gate_lora_dim(self) -> int:
        return self.gate_lora if self.gate_lora is not None else _lora_dim(5.0, self.hidden_size)

    @property
    def mix_lora_dim(self) -> int:
        return self.mix_lora if self.mix_lora is not None else 32

    @property
    def output_size(self) -> int:
        """Width of what the model returns per position."""
        return self.vocab_size or self.output_dim or self.hidden_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RWKVConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown RWKVConfig fields {unknown}; known: {sorted(names)}")
        return cls(**d)


def recommended_defaults() -> dict:
    """The backbone defaults (Edifice's names) used by ``build`` when an option is not given."""
    return dict(hidden_size=256, num_layers=6, head_size=64, dropout=0.1, window_size=60, version=7)


def _layer_params_v7(c: RWKVConfig, layer_id: int) -> int:
    C, F = c.hidden_size, c.ffn_dim
    att = 6 * C  # x_r, x_w, x_k, x_v, x_a, x_g
    att += C + 2 * C * c.decay_lora_dim  # w0, w1, w2
    att += C + 2 * C * c.a_lora_dim  # a0, a1, a2
    if layer_id > 0:
        att += C + 2 * C * c.v_lora_dim  # v0, v1, v2 (layer 0 has none: its v is v_first)
    att += 2 * C * c.gate_lora_dim  # g1, g2
    att += 3 * C  # k_k, k_a, r_k
    att += 4 * C * C + 2 * C  # receptance, key, value, output; ln_x
    ffn = C + 2 * C * F
    return att + ffn + 4 * C  # + ln1, ln2


def _layer_params_v56(c: RWKVConfig, layer_id: int) -> int:
    C, F = c.hidden_size, c.ffn_dim
    if c.version == 6:
        D, Dd = c.mix_lora_dim, c.decay_lora_dim
        att = 6 * C + 10 * C * D + C + 2 * C * Dd  # time_maa_*; time_maa_w1/w2; time_decay, time_decay_w1/w2
    else:
        att = 4 * C + C  # time_mix_k/v/r/g; time_decay [H, N]
    att += C + 5 * C * C + 2 * C  # time_faaaa; receptance, key, value, gate, output; ln_x
    ffn = 2 * C + 2 * C * F + C * C  # time_maa/mix_k, _r; key, value; receptance
    return att + ffn + 4 * C


def _layer_params_v4(c: RWKVConfig, layer_id: int) -> int:
    C, F = c.hidden_size, c.ffn_dim
    att = 5 * C + 4 * C * C  # time_decay, time_first, time_mix_k/v/r; key, value, receptance, output
    ffn = 2 * C + 2 * C * F + C * C
    return att + ffn + 4 * C


def count_params(c: RWKVConfig) -> int:
    """Exact parameter count of ``RWKV(c)``, from the sizes alone."""
    C = c.hidden_size
    per_layer = {4: _layer_params_v4, 5: _layer_params_v56, 6: _layer_params_v56, 7: _layer_params_v7}
    layers = sum(per_layer[c.version](c, i) for i in range(c.num_layers))
    total = layers + 2 * C + 2 * C  # ln0, ln_out
    if c.vocab_size is not None:
        total += 2 * c.vocab_size * C  # emb, head (untied, no bias)
    else:
        total += c.embed_dim * C + C  # input projection with bias
        if c.output_dim is not None:
            total += C * c.output_dim + c.output_dim
    return total


_CONFIG_FIELDS = {f.name for f in dataclasses.fields(RWKVConfig)}


def config_for(**options) -> RWKVConfig:
    """The RWKVConfig that ``build(**options)`` would use: ``recommended_defaults()`` overridden by ``options``.

    Token models (``vocab_size`` given) default to ``dropout=0``.
    """
    unknown = sorted(set(options) - _CONFIG_FIELDS - {"seed"})
    if unknown:
        raise TypeError(f"unknown build option(s) {unknown}; known: {sorted(_CONFIG_FIELDS)}")
    opts = recommended_defaults()
    if options.get("vocab_size") is not None:
        opts["dropout"] = 0.0
    opts.update({k: v for k, v in options.items() if k != "seed"})
    return RWKVConfig(**opts)


def param_count(**options) -> int:
    """The exact parameter count of ``build(**options)``, computed from the sizes without building."""
    return count_params(config_for(**options))


def output_size(**options) -> int:
    """Features per position returned by ``build(**options)``."""
    return config_for(**options).output_size
