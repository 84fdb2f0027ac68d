"""SFDLM model configuration.

This file is "remote code": it is copied next to the weights by `save_pretrained` and must
import only `transformers`, `torch` and its sibling remote-code files (relative imports).
"""

from transformers import PretrainedConfig

PROCESSES = ("uniform", "absorbing")
NOISE_SCHEDULES = ("linear", "cosine", "loglinear", "geometric")
OBJECTIVES = ("elbo", "ce", "score_entropy")
SSM_MODES = ("diagonal", "conv")


class SFDLMConfig(PretrainedConfig):
    r"""Configuration of a State Fourier Diffusion Language Model (SFDLM, arXiv 2503.17382).

    `SFDLMConfig()` with no arguments is a valid small model (uniform corruption, as in the paper).

    Args:
        vocab_size (`int`, defaults to 512):
            Number of token ids the model reads and predicts, special tokens included.
        hidden_size (`int`, defaults to 128):
            Width of the residual stream; every U-Net stage keeps this width.
        stage_depths (`list[int]`, defaults to `[2, 2]`):
            Number of SFDLM blocks per U-Net stage. Stage `i < len-1` is a down stage (mirrored by an
            up stage with the same number of blocks after the bottleneck); the last entry is the bottleneck.
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
            State size N of each channel's diagonal SSM (N/2 complex-conjugate mode pairs). Must be even.
        ssm_dt_min (`float`, defaults to 1e-3), ssm_dt_max (`float`, defaults to 1e-1):
            Range of the log-uniformly initialised discretisation steps of the diagonal SSM.
        conv_kernel_size (`int`, defaults to 7):
            Width of the centred depthwise convolution when `ssm_mode="conv"`. Must be odd.
        fourier_intermediate_size (`int`, defaults to 256):
            Hidden width of the complex Fourier MLP, which acts on the concatenated real and
            imaginary parts (`2 * hidden_size` features) of every frequency.
        dropout (`float`, defaults to 0.0):
            Dropout on each block's branch outputs.
        layer_norm_eps (`float`, defaults to 1e-5):
            Epsilon of the layer norms.
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
            Number T of diffusion steps of the discrete-time NELBO. `None` trains and evaluates the
            continuous-time NELBO (the T -> infinity limit).
        noise_schedule (`str`, defaults to `"linear"`):
            Schedule of the signal level alpha(t): `"linear"` (linear beta, the paper), `"cosine"`,
            `"loglinear"` (MDLM/SEDD), `"geometric"` (SEDD-uniform). All reach alpha(1) = 0 exactly, so the
            chain starts from the prior exactly.
        linear_beta_min (`float`, defaults to 0.1), linear_beta_max (`float`, defaults to 20.0):
            Rates of the `"linear"` schedule, beta(t) = beta_min + t (beta_max - beta_min).
        geometric_sigma_min (`float`, defaults to 1e-4), geometric_sigma_max (`float`, defaults to 20.0):
            Total-noise range of the `"geometric"` schedule.
        objective (`str`, defaults to `"elbo"`):
            `"elbo"`: the exact NELBO (discrete T or continuous time). `"ce"`: the paper's plain
            cross-entropy of the clean tokens at a random noise level (not a likelihood bound).
            `"score_entropy"`: SEDD (arXiv 2310.16834): the head emits log-scores (ratios p_t(y) / p_t(x_t))
            trained with the denoising score entropy, whose integral is the ELBO (`score_entropy.py`).
            Continuous time only (`num_timesteps=None`); SEDD's schedules are `"loglinear"` and `"geometric"`.
        mask_token_id (`int`, *optional*):
            Id of the absorbing state. Required when `process="absorbing"`.
        pad_token_id (`int`, *optional*), bos_token_id (`int`, *optional*), eos_token_id (`int`, *optional*):
            Special token ids, as in every transformers config.
        tie_word_embeddings (`bool`, defaults to `True`):
            Share the input embedding with the output head.
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the normal initialisation of linear and embedding weights.
        max_position_embeddings (`int`, defaults to 65536):
            Longest sequence the model accepts. The model has no position table; this bound only
            guards against accidental huge inputs and documents what was tested.
    """

    model_type = "sfdlm"

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
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.stage_depths = list(stage_depths) if stage_depths is not None else [2, 2]
        self.pool_factors = list(pool_factors) if pool_factors is not None else [1] * (len(self.stage_depths) - 1)
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
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate_sfdlm()

    def validate_sfdlm(self) -> None:
        """Raise `ValueError` naming the fields when the configuration contradicts itself."""

        def fail(message: str) -> None:
            raise ValueError(f"Invalid SFDLMConfig: {message}")

        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                fail(f"`{name}` must be a positive integer, got {value!r}.")

        for name in ("vocab_size", "hidden_size", "ssm_state_size", "conv_kernel_size",
                     "fourier_intermediate_size", "max_position_embeddings"):
            positive_int(name)
        if self.vocab_size < 2:
            fail(f"`vocab_size` must be at least 2, got {self.vocab_size}.")
        if not self.stage_depths or any(isinstance(d, bool) or not isinstance(d, int) or d < 1
                                        for d in self.stage_depths):
            fail(f"`stage_depths` must be a non-empty list of positive integers, got {self.stage_depths!r}.")
        if len(self.pool_factors) != len(self.stage_depths) - 1:
            fail(
                f"`pool_factors` needs one factor between each pair of stages, i.e. "
                f"{len(self.stage_depths) - 1} for `stage_depths={self.stage_depths}`, got {self.pool_factors!r}."
            )
        if any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in self.pool_factors):
            fail(f"`pool_factors` must be integers >= 1 (pooling that cannot be undone otherwise), "
                 f"got {self.pool_factors!r}.")
        if not (self.use_ssm or self.use_fourier_mlp):
            fail("a block needs at least one branch: `use_ssm` and `use_fourier_mlp` cannot both be False.")
        if self.ssm_mode not in SSM_MODES:
            fail(f"`ssm_mode` must be one of {SSM_MODES}, got {self.ssm_mode!r}.")
        if self.ssm_state_size % 2:
            fail(f"`ssm_state_size` must be even (complex-conjugate pairs), got {self.ssm_state_size}.")
        if not 0 < self.ssm_dt_min <= self.ssm_dt_max:
            fail(f"need 0 < `ssm_dt_min` <= `ssm_dt_max`, got {self.ssm_dt_min} and {self.ssm_dt_max}.")
        if self.conv_kernel_size % 2 == 0:
            fail(f"`conv_kernel_size` must be odd (a centred kernel), got {self.conv_kernel_size}.")
        if not 0.0 <= self.dropout < 1.0:
            fail(f"`dropout` must be in [0, 1), got {self.dropout}.")
        if self.process not in PROCESSES:
            fail(f"`process` must be one of {PROCESSES}, got {self.process!r}.")
        if self.noise_schedule not in NOISE_SCHEDULES:
            fail(f"`noise_schedule` must be one of {NOISE_SCHEDULES}, got {self.noise_schedule!r}.")
        if self.objective not in OBJECTIVES:
            fail(f"`objective` must be one of {OBJECTIVES}, got {self.objective!r}.")
        if self.objective == "score_entropy" and self.num_timesteps is not None:
            fail(f"`objective='score_entropy'` is continuous-time: set `num_timesteps=None`, got {self.num_timesteps!r}.")
        if self.num_timesteps is not None:
            positive_int("num_timesteps")
        if not 0 <= self.linear_beta_min <= self.linear_beta_max or self.linear_beta_max <= 0:
            fail(f"need 0 <= `linear_beta_min` <= `linear_beta_max` and `linear_beta_max` > 0, "
                 f"got {self.linear_beta_min} and {self.linear_beta_max}.")
        if not 0 < self.geometric_sigma_min < self.geometric_sigma_max:
            fail(f"need 0 < `geometric_sigma_min` < `geometric_sigma_max`, "
                 f"got {self.geometric_sigma_min} and {self.geometric_sigma_max}.")
        if self.process == "absorbing" and self.mask_token_id is None:
            fail("`process='absorbing'` needs `mask_token_id` (the absorbing state), got None.")
        for name in ("mask_token_id", "pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name, None)
            if value is not None and not (isinstance(value, int) and 0 <= value < self.vocab_size):
                fail(f"`{name}`={value!r} must be an id in [0, vocab_size={self.vocab_size}).")

    @property
    def total_pool_factor(self) -> int:
        """Product of the pooling factors: how much shorter the bottleneck sequence is."""
        total = 1
        for factor in self.pool_factors:
            total *= factor
        return total


SFDLMConfig.register_for_auto_class()

__all__ = ["SFDLMConfig"]
