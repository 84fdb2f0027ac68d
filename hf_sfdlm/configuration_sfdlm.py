"""SFDLM model configuration.

This file is "remote code": it is copied next to the weights by `save_pretrained` and must
import only `transformers`, `torch` and its sibling remote-code files (relative imports).
"""

import math
import numbers

from transformers import PretrainedConfig

PROCESSES = ("uniform", "absorbing")
NOISE_SCHEDULES = ("linear", "cosine", "loglinear", "geometric")
OBJECTIVES = ("elbo", "ce", "score_entropy")
SSM_MODES = ("diagonal", "conv")

# Ranges of the real-valued fields: (low, low included, high, high included); every value must also be finite.
# The bounds mark where a model stops being trainable (the reasons are in the class docstring):
MAX_SSM_DT = 1e3  # exp(-dt/2) per position: beyond it every SSM mode forgets within one position
MAX_TOTAL_NOISE = 100.0  # alpha(t) >= e^-100 > float32's smallest positive number (e^-103) for every t < 1
MAX_INITIALIZER_RANGE = 1.0  # 50x the default 0.02; 100 overflows float32 (NaN loss, measured)
MAX_NUM_TIMESTEPS = 10**9  # float64 must resolve t - 1/T next to t = 1 (T < 2^52); past 1e9 use None (T -> inf)
MIN_LAYER_NORM_EPS = 1e-12  # BERT's value; 1e-300 rounds to 0 in float32 (NaN at hidden_size=1, measured)
# score_entropy: initializer_range * sqrt(hidden_size) at most this (its loss exponentiates the head's outputs;
# measured first losses: 1.13 -> 7-11 nats, 1.6 -> up to 9.5e3, 3.4 -> inf)
MAX_SCORE_SCALE = 1.5
FLOAT_RANGES = {
    "ssm_dt_min": (0.0, False, MAX_SSM_DT, True),
    "ssm_dt_max": (0.0, False, MAX_SSM_DT, True),
    "dropout": (0.0, True, 1.0, False),
    "layer_norm_eps": (MIN_LAYER_NORM_EPS, True, math.inf, False),
    "linear_beta_min": (0.0, True, MAX_TOTAL_NOISE, True),
    "linear_beta_max": (0.0, False, MAX_TOTAL_NOISE, True),
    "geometric_sigma_min": (0.0, False, MAX_TOTAL_NOISE, False),
    "geometric_sigma_max": (0.0, False, MAX_TOTAL_NOISE, True),
    "initializer_range": (0.0, False, MAX_INITIALIZER_RANGE, True),
}


def _fail(kind: type[Exception], message: str) -> None:
    raise kind(f"Invalid SFDLMConfig: {message}")


def _show(value) -> str:
    """The value and, when it is not a plain number, its type (`'1e-6'` (str) reads differently from 1e-6)."""
    text = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    return text if isinstance(value, (int, float)) and not isinstance(value, bool) else f"{text} ({type(value).__name__})"


def _integer(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        hint = " (a string: write the number without quotes)" if isinstance(value, str) else ""
        _fail(TypeError, f"`{name}` must be {'a positive integer' if low == 1 else 'an integer'}, "
                         f"got {_show(value)}{hint}.")
    if value < low:
        _fail(ValueError, f"`{name}` must be {'a positive integer' if low == 1 else f'an integer >= {low}'}, "
                          f"got {value!r}.")


def _real(name: str, value, low: float, low_included: bool, high: float, high_included: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        hint = (" (a string: YAML 1.1 reads `1e-6` as text, write `1.0e-6`, or drop the quotes)"
                if isinstance(value, str) else "")
        _fail(TypeError, f"`{name}` must be a real number, got {_show(value)}{hint}.")
    if not math.isfinite(value) or not (low <= value if low_included else low < value) \
            or not (value <= high if high_included else value < high):
        interval = f"{'[' if low_included else '('}{low:g}, {high:g}{']' if high_included else ')'}"
        _fail(ValueError, f"`{name}` must be a finite number in {interval}, got {value!r}.")


def _token_id(name: str, value, vocab_size):
    """`value` when it is None or an id in [0, vocab_size); raises naming `name` otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _fail(TypeError, f"`{name}`={_show(value)} must be an integer id in [0, vocab_size={vocab_size}).")
    if not 0 <= value < vocab_size:
        _fail(ValueError, f"`{name}`={value!r} must be an id in [0, vocab_size={vocab_size}).")
    return value


def _as_list(name: str, value) -> list:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        _fail(TypeError, f"`{name}` must be a list of integers, got {_show(value)}.")
    return [int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else v for v in value]


def _plain(value):
    """numpy/torch scalars as Python numbers, so the config stays JSON-serialisable; anything else as is."""
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, int)):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):
        return float(value)
    return value


class SFDLMConfig(PretrainedConfig):
    r"""Configuration of a State Fourier Diffusion Language Model (SFDLM, arXiv 2503.17382).

    `SFDLMConfig()` with no arguments is a valid small model (uniform corruption, as in the paper).

    Every field is checked when the config is built (also when it is loaded from `config.json`): a value of the
    wrong kind raises `TypeError`, a value out of range (NaN and infinities included) or fields that contradict
    each other raise `ValueError`; both name the field and the value. Integers must be Python/numpy integers
    (not `2.0`), real numbers must be numbers (not the string `"1e-6"`), flags must be booleans.

    Args:
        vocab_size (`int`, defaults to 512):
            Number of token ids the model reads and predicts, special tokens included. At least 2.
        hidden_size (`int`, defaults to 128):
            Width of the residual stream; every U-Net stage keeps this width. Positive.
        stage_depths (`list[int]`, defaults to `[2, 2]`):
            Number of SFDLM blocks per U-Net stage (a non-empty list of positive integers). Stage `i < len-1`
            is a down stage (mirrored by an up stage with the same number of blocks after the bottleneck); the
            last entry is the bottleneck.
            `[n]` is a plain stack of `n` blocks.
        pool_factors (`list[int]`, *optional*):
            Sequence pooling factor between consecutive stages (length `len(stage_depths) - 1`). `1` keeps
            the length; `k > 1` shortens the sequence `k`-fold on the way down (a linear map of `k` stacked
            positions, as in SaShiMi) and restores it on the way up. Defaults to all ones.
        ssm_mode (`str`, defaults to `"diagonal"`):
            `"diagonal"`: a bidirectional diagonal state-space model (S4D) whose convolution kernel
            `K_n = C A^n B` is computed for the actual length and applied by zero-padded FFT.
            `"conv"`: the short depthwise convolution of the paper's reference code.
        ssm_state_size (`int`, defaults to 16):
            State size N of each channel's diagonal SSM (N/2 complex-conjugate mode pairs). Positive and even.
        ssm_dt_min (`float`, defaults to 1e-3), ssm_dt_max (`float`, defaults to 1e-1):
            Range of the log-uniformly initialised discretisation steps of the diagonal SSM:
            0 < `ssm_dt_min` <= `ssm_dt_max` <= 1000. Each mode decays by exp(-dt/2) per position at
            initialisation, so beyond 1000 every mode forgets within one position (exp(-500) is 0 in float32).
        conv_kernel_size (`int`, defaults to 7):
            Width of the centred depthwise convolution when `ssm_mode="conv"`. Positive and odd.
        fourier_intermediate_size (`int`, defaults to 256):
            Hidden width of the complex Fourier MLP, which acts on the concatenated real and
            imaginary parts (`2 * hidden_size` features) of every frequency. Positive.
        dropout (`float`, defaults to 0.0):
            Dropout probability on each block's branch outputs, in [0, 1).
        layer_norm_eps (`float`, defaults to 1e-5):
            Epsilon of the layer norms, finite and >= 1e-12 (BERT's value, a conservative floor): below
            float32's range (e.g. 1e-300) it rounds to 0 and a constant feature vector, such as every one with
            `hidden_size=1`, divides 0 by 0 (NaN loss, measured).
        use_ssm (`bool`, defaults to `True`), use_fourier_mlp (`bool`, defaults to `True`):
            Keep the SSM branch / the complex Fourier MLP branch of every block. Setting one to `False` is the
            paper's ablation (a block without that branch); at least one must stay.
        time_conditioning (`bool`, defaults to `True`):
            Condition every block on the noise level `t` through adaLN (shift, scale, gate), as in DiT/MDLM.
            Without it the denoiser sees only the corrupted tokens.
        process (`str`, defaults to `"uniform"`):
            Corruption process. `"uniform"`: mix with the uniform distribution over the vocabulary (the
            SFDLM paper, D3PM-uniform, UDLM). `"absorbing"`: mix with a point mass on `mask_token_id`
            (D3PM-absorb, MDLM).
        num_timesteps (`int`, *optional*, defaults to 1000):
            Number T of diffusion steps of the discrete-time NELBO (a positive integer, at most 1e9: float64
            must tell t from t - 1/T near t = 1, and at T = 2^62 the loss is exactly 0). `None` trains and
            evaluates the continuous-time NELBO (the T -> infinity limit).
        noise_schedule (`str`, defaults to `"linear"`):
            Schedule of the signal level alpha(t): `"linear"` (linear beta, the paper), `"cosine"`,
            `"loglinear"` (MDLM/SEDD), `"geometric"` (SEDD-uniform). All reach alpha(1) = 0 exactly, so the
            chain starts from the prior exactly.
        linear_beta_min (`float`, defaults to 0.1), linear_beta_max (`float`, defaults to 20.0):
            Rates of the `"linear"` schedule, beta(t) = beta_min + t (beta_max - beta_min), with
            0 <= `linear_beta_min` <= `linear_beta_max` <= 100 and `linear_beta_max` > 0.
        geometric_sigma_min (`float`, defaults to 1e-4), geometric_sigma_max (`float`, defaults to 20.0):
            Total-noise range of the `"geometric"` schedule: 0 < `geometric_sigma_min` < `geometric_sigma_max`
            <= 100. Both upper bounds keep the total noise at most 100, so alpha(t) >= e^-100 stays above
            float32's smallest positive number (about e^-103) for every t < 1. Beyond them a growing share of
            noise levels carries no signal in float32 and a batch's loss can be exactly 0 (measured, batches
            of 4 rows, `linear_beta_max=1000`: 1 draw in 4; `1e4`: 3 in 4). Within them, large values still
            waste draws: the discrete uniform loss resolves alpha(t) only above float32's resolution (about
            e^-16), i.e. for t < 0.57 at `linear_beta_max=100` with the default `linear_beta_min`.
        objective (`str`, defaults to `"elbo"`):
            `"elbo"`: the exact NELBO (discrete T or continuous time). `"ce"`: the paper's plain
            cross-entropy of the clean tokens at a random noise level (not a likelihood bound).
            `"score_entropy"`: SEDD (arXiv 2310.16834): the head emits log-scores (ratios p_t(y) / p_t(x_t))
            trained with the denoising score entropy, whose integral is the ELBO (`score_entropy.py`).
            Continuous time only (`num_timesteps=None`); SEDD's schedules are `"loglinear"` and `"geometric"`.
        mask_token_id (`int`, *optional*):
            Id of the absorbing state, in [0, vocab_size). Required when `process="absorbing"`.
        pad_token_id (`int`, *optional*), bos_token_id (`int`, *optional*), eos_token_id (`int`, *optional*):
            Special token ids, as in every transformers config; each in [0, vocab_size) when set.
        tie_word_embeddings (`bool`, defaults to `True`):
            Share the input embedding with the output head.
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the normal initialisation of linear and embedding weights, in (0, 1]. A
            d-wide linear layer multiplies a unit-variance input's scale by about std * sqrt(d): 0.2-0.6 at the
            default for widths 128-1024, already 11-32x at 1.0; 100 overflows float32 (NaN loss, measured).
            With `objective="score_entropy"`, whose loss exponentiates the head's outputs, also
            `initializer_range * sqrt(hidden_size) <= 1.5` (0.02 allows widths up to 5625; measured first losses:
            7-11 nats at 1.13, up to 9.5e3 at 1.6, inf at 3.4).
        max_position_embeddings (`int`, defaults to 65536):
            Longest sequence the model accepts (positive). The model has no position table; this bound only
            guards against accidental huge inputs and documents what was tested.
        block_size (`int`, *optional*):
            Block diffusion (BD3-LM; `block_diffusion.py`). `None` (default): the full-canvas model, every block
            of text denoised together. An integer b: the sequence is cut into blocks of b tokens (from each
            row's first real token); each block is denoised at its own noise level from its own tokens and the
            clean earlier blocks, which it reads only through the forward SSM's state (exactly, no truncation).
            The loss is the sum of the blocks' NELBOs and `generate` produces one block after another with a
            cache of fixed size (the SSM states), to any length. A positive multiple of the product of
            `pool_factors` (pooling stays inside a block); needs `ssm_mode="diagonal"` and `use_ssm=True` (the
            state that carries the prefix) and `objective` "elbo" or "ce". Not the `data.block_size` of
            training configs (the length of packed training sequences).
    """

    model_type = "sfdlm"
    _NUMERIC_FIELDS = ("vocab_size", "hidden_size", "ssm_state_size", "ssm_dt_min", "ssm_dt_max", "conv_kernel_size",
                       "fourier_intermediate_size", "dropout", "layer_norm_eps", "num_timesteps", "linear_beta_min",
                       "linear_beta_max", "geometric_sigma_min", "geometric_sigma_max", "mask_token_id",
                       "pad_token_id", "bos_token_id", "eos_token_id", "initializer_range", "max_position_embeddings",
                       "block_size")

    def __init__(
        self,
        vocab_size: int = 512,
        hidden_size: int = 128,
        stage_depths: list[int] | None = None,
        pool_factors: list[int] | None = None,
        ssm_mode: str = "diagonal",
        ssm_state_size: int = 16,
        ssm_dt_min: float = 1e-3,
        ssm_dt_max: float = 1e-1,
        conv_kernel_size: int = 7,
        fourier_intermediate_size: int = 256,
        dropout: float = 0.0,
        layer_norm_eps: float = 1e-5,
        use_ssm: bool = True,
        use_fourier_mlp: bool = True,
        time_conditioning: bool = True,
        process: str = "uniform",
        num_timesteps: int | None = 1000,
        noise_schedule: str = "linear",
        linear_beta_min: float = 0.1,
        linear_beta_max: float = 20.0,
        geometric_sigma_min: float = 1e-4,
        geometric_sigma_max: float = 20.0,
        objective: str = "elbo",
        mask_token_id: int | None = None,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        tie_word_embeddings: bool = True,
        initializer_range: float = 0.02,
        max_position_embeddings: int = 65536,
        block_size: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.stage_depths = _as_list("stage_depths", stage_depths) if stage_depths is not None else [2, 2]
        self.pool_factors = (_as_list("pool_factors", pool_factors) if pool_factors is not None
                             else [1] * (len(self.stage_depths) - 1))
        self.ssm_mode = ssm_mode
        self.ssm_state_size = ssm_state_size
        self.ssm_dt_min = ssm_dt_min
        self.ssm_dt_max = ssm_dt_max
        self.conv_kernel_size = conv_kernel_size
        self.fourier_intermediate_size = fourier_intermediate_size
        self.dropout = dropout
        self.layer_norm_eps = layer_norm_eps
        self.use_ssm = use_ssm
        self.use_fourier_mlp = use_fourier_mlp
        self.time_conditioning = time_conditioning
        self.process = process
        self.num_timesteps = num_timesteps
        self.noise_schedule = noise_schedule
        self.linear_beta_min = linear_beta_min
        self.linear_beta_max = linear_beta_max
        self.geometric_sigma_min = geometric_sigma_min
        self.geometric_sigma_max = geometric_sigma_max
        self.objective = objective
        self.mask_token_id = mask_token_id
        self.initializer_range = initializer_range
        self.max_position_embeddings = max_position_embeddings
        self.block_size = block_size
        # transformers' own validators compare the token ids with `vocab_size`: give them numbers, or name the field.
        _integer("vocab_size", _plain(vocab_size), low=2)
        pad_token_id, bos_token_id, eos_token_id = (
            _token_id(name, _plain(value), _plain(vocab_size)) for name, value in
            (("pad_token_id", pad_token_id), ("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id)))
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        for name in self._NUMERIC_FIELDS:
            setattr(self, name, _plain(getattr(self, name)))
        self.validate_sfdlm()

    def validate_sfdlm(self) -> None:
        """Check every field's type and range, then the fields against each other.

        Raises:
            TypeError: a field holds the wrong kind of value (a string where a number belongs, `None`, a float
                where an integer belongs, a non-bool flag), naming the field and the value.
            ValueError: a value outside its range (non-finite, not positive, beyond the bounds documented on
                the field) or fields that contradict each other, naming the fields and the values.
        """
        for name in ("vocab_size", "hidden_size", "ssm_state_size", "conv_kernel_size",
                     "fourier_intermediate_size", "max_position_embeddings"):
            _integer(name, getattr(self, name), low=1)
        _integer("vocab_size", self.vocab_size, low=2)
        if self.num_timesteps is not None:
            _integer("num_timesteps", self.num_timesteps, low=1)
            if self.num_timesteps > MAX_NUM_TIMESTEPS:
                _fail(ValueError, f"`num_timesteps` must be at most {MAX_NUM_TIMESTEPS:.0e} (float64 cannot tell t from "
                                  f"t - 1/T near t = 1 much beyond it: the loss becomes exactly 0); use None for the "
                                  f"continuous-time limit, got {self.num_timesteps!r}.")
        for name in ("use_ssm", "use_fourier_mlp", "time_conditioning", "tie_word_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                _fail(TypeError, f"`{name}` must be True or False, got {_show(value)}.")
        for name, bounds in FLOAT_RANGES.items():
            _real(name, getattr(self, name), *bounds)

        if not self.stage_depths or any(isinstance(d, bool) or not isinstance(d, int) or d < 1
                                        for d in self.stage_depths):
            _fail(ValueError, f"`stage_depths` must be a non-empty list of positive integers, got {self.stage_depths!r}.")
        if len(self.pool_factors) != len(self.stage_depths) - 1:
            _fail(ValueError,
                  f"`pool_factors` needs one factor between each pair of stages, i.e. "
                  f"{len(self.stage_depths) - 1} for `stage_depths={self.stage_depths}`, got {self.pool_factors!r}.")
        if any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in self.pool_factors):
            _fail(ValueError, f"`pool_factors` must be integers >= 1 (pooling that cannot be undone otherwise), "
                              f"got {self.pool_factors!r}.")
        if not (self.use_ssm or self.use_fourier_mlp):
            _fail(ValueError, "a block needs at least one branch: `use_ssm` and `use_fourier_mlp` cannot both be False.")
        for name, allowed in (("ssm_mode", SSM_MODES), ("process", PROCESSES),
                              ("noise_schedule", NOISE_SCHEDULES), ("objective", OBJECTIVES)):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in allowed:
                _fail(ValueError, f"`{name}` must be one of {allowed}, got {_show(value)}.")
        if self.ssm_state_size % 2:
            _fail(ValueError, f"`ssm_state_size` must be even (complex-conjugate pairs), got {self.ssm_state_size}.")
        if not self.ssm_dt_min <= self.ssm_dt_max:
            _fail(ValueError, f"need `ssm_dt_min` <= `ssm_dt_max`, got {self.ssm_dt_min!r} and {self.ssm_dt_max!r}.")
        if self.conv_kernel_size % 2 == 0:
            _fail(ValueError, f"`conv_kernel_size` must be odd (a centred kernel), got {self.conv_kernel_size}.")
        if self.objective == "score_entropy" and self.num_timesteps is not None:
            _fail(ValueError, f"`objective='score_entropy'` is continuous-time: set `num_timesteps=None`, "
                              f"got {self.num_timesteps!r}.")
        if not self.linear_beta_min <= self.linear_beta_max:
            _fail(ValueError, f"need `linear_beta_min` <= `linear_beta_max`, "
                              f"got {self.linear_beta_min!r} and {self.linear_beta_max!r}.")
        if not self.geometric_sigma_min < self.geometric_sigma_max:
            _fail(ValueError, f"need `geometric_sigma_min` < `geometric_sigma_max`, "
                              f"got {self.geometric_sigma_min!r} and {self.geometric_sigma_max!r}.")
        if self.process == "absorbing" and self.mask_token_id is None:
            _fail(ValueError, "`process='absorbing'` needs `mask_token_id` (the absorbing state), got None.")
        for name in ("mask_token_id", "pad_token_id", "bos_token_id", "eos_token_id"):
            _token_id(name, getattr(self, name, None), self.vocab_size)
        if self.process == "absorbing" and self.mask_token_id is not None and \
                getattr(self, "eos_token_id", None) == self.mask_token_id:
            _fail(ValueError, f"`eos_token_id` equals `mask_token_id` ({self.mask_token_id}): the absorbing state "
                              "cannot also be a token of the clean text; give the mask and EOS different ids.")
        if self.objective == "score_entropy" and self.initializer_range * math.sqrt(self.hidden_size) > MAX_SCORE_SCALE:
            _fail(ValueError, f"`objective='score_entropy'` exponentiates the head's outputs: need `initializer_range` * "
                              f"sqrt(`hidden_size`) <= {MAX_SCORE_SCALE}, got {self.initializer_range!r} * "
                              f"sqrt({self.hidden_size}) = {self.initializer_range * math.sqrt(self.hidden_size):.3g}.")

        self._validate_block_size()

    def _validate_block_size(self) -> None:
        size = getattr(self, "block_size", None)
        if size is None:
            return
        _integer("block_size", size, low=1)
        if size % self.total_pool_factor:
            _fail(ValueError, f"`block_size`={size} must be a multiple of the product of `pool_factors` "
                              f"{self.pool_factors} ({self.total_pool_factor}): pooling stays inside a block.")
        if self.ssm_mode != "diagonal" or not self.use_ssm:
            _fail(ValueError, f"`block_size` needs the diagonal SSM (`ssm_mode='diagonal'`, `use_ssm=True`), whose "
                              f"state carries the earlier blocks; got ssm_mode={self.ssm_mode!r}, "
                              f"use_ssm={self.use_ssm!r} (the convolution mixer has no state).")
        if self.objective == "score_entropy":
            _fail(ValueError, "`block_size` supports objective 'elbo' and 'ce', not 'score_entropy' (SEDD).")

    @property
    def total_pool_factor(self) -> int:
        """Product of the pooling factors: how much shorter the bottleneck sequence is."""
        total = 1
        for factor in self.pool_factors:
            total *= factor
        return total


SFDLMConfig.register_for_auto_class()

__all__ = ["SFDLMConfig"]
