"""Property-based fuzzing (hypothesis) of every surface that takes user values: `SFDLMConfig` keyword
arguments, `forward`/`nelbo` inputs and `generate` arguments.

Each example mixes well-formed values with at most a few hostile ones (NaN, infinities, negatives, wrong
dtypes and shapes, strings where numbers belong, `None`, Python lists where tensors belong...). The only
outcomes allowed:

* success, with an output that is usable: finite losses and NELBOs, logits without NaN, generated ids in
  the vocabulary with no mask token left;
* a `ValueError`/`TypeError` whose message names one of the hostile arguments (an all-well-formed example
  must succeed).

Anything else (an error from inside torch, an error naming nothing, NaN, a refusal of good input) fails.
The suite runs a bounded, derandomized number of examples (`SFDLM_FUZZ_EXAMPLES` scales it). A campaign
that counts outcome classes instead of stopping at the first failure:

    SFDLM_FUZZ_CAMPAIGN=fuzz_counts.json SFDLM_FUZZ_EXAMPLES=2000 python -m pytest -q tests/test_fuzz.py
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter, defaultdict

import pytest
import torch
from conftest import tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_sfdlm import SFDLMConfig, SFDLMForDiffusionLM
from hf_sfdlm.configuration_sfdlm import NOISE_SCHEDULES, OBJECTIVES, PROCESSES, SSM_MODES

CAMPAIGN = os.environ.get("SFDLM_FUZZ_CAMPAIGN")  # a JSON path: count outcomes instead of asserting
SCALE = int(os.environ.get("SFDLM_FUZZ_EXAMPLES", "0"))
NAN, INF = float("nan"), float("inf")


def fuzz_settings(examples: int):
    return settings(max_examples=SCALE or examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


# ---------------------------------------------------------------------------------------------- outcomes
OUTCOMES: dict[str, Counter] = defaultdict(Counter)
EXAMPLES: dict[str, dict[str, str]] = defaultdict(dict)
SIGNATURES: dict[str, Counter] = defaultdict(Counter)  # campaign: failures grouped by their message


class BadOutput(AssertionError):
    """The call succeeded but returned something unusable (NaN, mask tokens left, wrong ids)."""


def classify(call, hostile: set[str]) -> tuple[str, str]:
    """Run `call` and name its outcome: `ok`, `refused` (clear error), or a failure class with details."""
    try:
        call()
    except (ValueError, TypeError) as error:
        message = str(error)
        if not hostile:
            return "good input refused", f"{type(error).__name__}: {message}"
        if not any(name in message for name in hostile):
            return "error naming no bad argument", f"{sorted(hostile)} -> {type(error).__name__}: {message}"
        return f"refused ({type(error).__name__})", ""
    except BadOutput as error:
        return "unusable output", f"{sorted(hostile)} -> {error}"
    except Exception as error:  # noqa: BLE001 - any other exception is the finding
        return "crash", f"{sorted(hostile)} -> {type(error).__name__}: {str(error)[:300]}"
    return "ok", ""


def record(surface: str, call, hostile: set[str], description: str) -> None:
    kind, detail = classify(call, hostile)
    OUTCOMES[surface][kind] += 1
    if kind != "ok" and not kind.startswith("refused"):
        EXAMPLES[surface].setdefault(kind, f"{description}\n    {detail}")
        SIGNATURES[surface][f"{kind}: {re.sub(r'(?<![A-Za-z_])-?[0-9][0-9.e+-]*', 'N', detail)[:160]}"] += 1
        if not CAMPAIGN:
            raise AssertionError(f"{surface}: {kind}\n  input: {description}\n  {detail}")


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if CAMPAIGN:
        with open(CAMPAIGN, "w") as handle:
            json.dump({"outcomes": OUTCOMES, "failures": SIGNATURES, "first_example_per_failure": EXAMPLES},
                      handle, indent=1)


def pick(draw, good, bad, name: str, hostile: set[str]):
    """A good value or (one time in eight) a hostile one, remembered in `hostile` by argument name; with five
    or six arguments per call about half the examples are entirely well-formed."""
    if draw(st.integers(0, 7)) == 0:
        hostile.add(name)
        return draw(bad)
    return draw(good)


# Hostile values by the kind of value the argument expects.
BAD_NUMBER = st.sampled_from([NAN, INF, -INF, -1.0, 0.0, 1e300, -1e-300, "1e-6", None, True, [1.0]])
BAD_INT = st.sampled_from([0, -1, 2.5, "16", None, True, NAN, [2]])
BAD_FLAG = st.sampled_from(["false", 0, 1, None, "True"])
BAD_NAME = st.sampled_from(["", "UNIFORM", None, 3, ["uniform"]])


# ---------------------------------------------------------------------------------------------- SFDLMConfig
@st.composite
def config_kwargs(draw):
    """Mostly well-formed, consistent keyword arguments with zero, one or two hostile fields."""
    hostile: set[str] = set()
    bad_fields = set(draw(st.lists(st.sampled_from(CONFIG_FIELDS), max_size=2)))
    kwargs = {}

    def field(name, good, bad):
        if name in bad_fields:
            hostile.add(name)
            kwargs[name] = draw(bad)
        elif draw(st.booleans()):
            kwargs[name] = draw(good)

    vocab = draw(st.integers(8, 40))
    kwargs["vocab_size"] = vocab
    if "vocab_size" in bad_fields:
        hostile.add("vocab_size")
        kwargs["vocab_size"] = draw(st.sampled_from([1, 0, -3, 16.0, "32", None, True]))
    field("hidden_size", st.integers(1, 24), BAD_INT)
    depths = draw(st.lists(st.integers(1, 2), min_size=1, max_size=3))
    field("stage_depths", st.just(depths), st.sampled_from([3, "22", [], [0], [1.5], [True], [-1]]))
    if "stage_depths" not in kwargs:
        depths = [2, 2]
    field("pool_factors", st.lists(st.integers(1, 3), min_size=len(depths) - 1, max_size=len(depths) - 1),
          st.sampled_from([2, [0] * (len(depths) - 1) or [0], [1.5] * (len(depths) - 1) or [1.5], [1] * len(depths)]))
    field("ssm_mode", st.sampled_from(SSM_MODES), BAD_NAME)
    field("ssm_state_size", st.sampled_from([2, 4, 8]), st.sampled_from([0, 3, -2, 4.0, "4", None]))

    def ordered_pair(names, values, bad):
        """Both fields or neither (one alone could contradict the other's default), each maybe hostile."""
        if draw(st.booleans()) or set(names) & bad_fields:
            for name, value in zip(names, values):
                kwargs[name] = value
                if name in bad_fields:
                    hostile.add(name)
                    kwargs[name] = draw(bad)

    ordered_pair(("ssm_dt_min", "ssm_dt_max"), sorted(draw(st.lists(st.floats(1e-4, 1e3), min_size=2, max_size=2))),
                 BAD_NUMBER)
    field("conv_kernel_size", st.sampled_from([1, 3, 5]), st.sampled_from([0, 4, -3, 3.0, "3", None]))
    field("fourier_intermediate_size", st.integers(1, 32), BAD_INT)
    field("dropout", st.floats(0.0, 0.99), st.sampled_from([NAN, 1.0, -0.1, None, "0.1", INF]))
    field("layer_norm_eps", st.floats(1e-12, 1e3), BAD_NUMBER)
    branches = draw(st.sampled_from([(True, True), (True, False), (False, True)]))
    field("use_ssm", st.just(branches[0]), BAD_FLAG)
    field("use_fourier_mlp", st.just(branches[1]), BAD_FLAG)
    field("time_conditioning", st.booleans(), BAD_FLAG)
    field("tie_word_embeddings", st.booleans(), BAD_FLAG)
    field("process", st.sampled_from(PROCESSES), BAD_NAME)
    field("noise_schedule", st.sampled_from(NOISE_SCHEDULES), BAD_NAME)
    field("objective", st.sampled_from(OBJECTIVES), BAD_NAME)
    field("num_timesteps", st.one_of(st.none(), st.integers(1, 10**9)),
          st.sampled_from([0, -5, 10.0, "1000", True, NAN, 2**62]))
    if kwargs.get("objective") == "score_entropy" and "num_timesteps" not in bad_fields:
        kwargs["num_timesteps"] = None  # SEDD is continuous-time only
    beta = sorted(draw(st.lists(st.floats(0.0, 100.0), min_size=2, max_size=2)))
    ordered_pair(("linear_beta_min", "linear_beta_max"), [beta[0], beta[1] or 1.0], BAD_NUMBER)
    sigma = sorted(draw(st.lists(st.floats(1e-8, 100.0), min_size=2, max_size=2, unique=True)))
    ordered_pair(("geometric_sigma_min", "geometric_sigma_max"), sigma, BAD_NUMBER)
    ids = st.integers(0, vocab - 1)
    bad_id = st.sampled_from([-1, vocab, 2.0, True, "3"])
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        field(name, ids, bad_id)
    field("mask_token_id", ids, bad_id)
    if kwargs.get("process") == "absorbing" and "mask_token_id" not in kwargs:
        kwargs["mask_token_id"] = vocab - 1
    field("initializer_range", st.floats(1e-6, 1.0), BAD_NUMBER)
    if kwargs.get("objective") == "score_entropy" and not {"initializer_range", "hidden_size"} & hostile:
        # SEDD's loss exponentiates the head's outputs: the config bounds initializer_range * sqrt(hidden_size)
        limit = 1.5 / math.sqrt(kwargs.get("hidden_size", 128))
        kwargs["initializer_range"] = min(kwargs.get("initializer_range", 0.02), limit)
    field("max_position_embeddings", st.integers(64, 10**12), BAD_INT)
    return kwargs, hostile


CONFIG_FIELDS = ("vocab_size", "hidden_size", "stage_depths", "pool_factors", "ssm_mode", "ssm_state_size",
                 "ssm_dt_min", "ssm_dt_max", "conv_kernel_size", "fourier_intermediate_size", "dropout",
                 "layer_norm_eps", "use_ssm", "use_fourier_mlp", "time_conditioning", "tie_word_embeddings",
                 "process", "noise_schedule", "objective", "num_timesteps", "linear_beta_min", "linear_beta_max",
                 "geometric_sigma_min", "geometric_sigma_max", "pad_token_id", "bos_token_id", "eos_token_id",
                 "mask_token_id", "initializer_range", "max_position_embeddings")


def train_and_score(config: SFDLMConfig) -> None:
    """Build the model, take a training loss and gradient and (for likelihood objectives) a NELBO: all usable."""
    model = SFDLMForDiffusionLM(config).train()
    top = config.vocab_size - 1 if config.process == "absorbing" and config.mask_token_id == config.vocab_size - 1 \
        else config.vocab_size
    ids = torch.randint(0, top, (2, 8), generator=torch.Generator().manual_seed(0))
    if config.process == "absorbing":
        ids[ids == config.mask_token_id] = (config.mask_token_id + 1) % config.vocab_size
    loss = model(ids, labels=ids, generator=torch.Generator().manual_seed(0)).loss
    if not torch.isfinite(loss):
        raise BadOutput(f"training loss {loss.item()}")
    loss.backward()
    if config.objective != "ce":  # stratified draws: one lies in [0, 1/4), where every allowed schedule has signal
        nelbo = model.eval().nelbo(ids, num_samples=4, generator=torch.Generator().manual_seed(0))
        if not torch.isfinite(nelbo).all() or not (nelbo > 0).all():
            raise BadOutput(f"NELBO {nelbo.tolist()} (must be finite and > 0)")


@fuzz_settings(40)
@given(config_kwargs())
def test_config_kwargs(example):
    kwargs, hostile = example
    record("SFDLMConfig", lambda: train_and_score(SFDLMConfig(**kwargs)), hostile, repr(kwargs))


# ---------------------------------------------------------------------------------------------- forward / nelbo
VOCAB = 32
MASK = VOCAB - 1
MODEL_SPECS = (
    dict(process="uniform", num_timesteps=None),
    dict(process="uniform", num_timesteps=50, noise_schedule="cosine"),
    dict(process="absorbing", mask_token_id=MASK, num_timesteps=None),
    dict(process="absorbing", mask_token_id=MASK, num_timesteps=50, noise_schedule="linear"),
    dict(process="uniform", objective="score_entropy", noise_schedule="geometric"),
    dict(process="absorbing", mask_token_id=MASK, objective="score_entropy"),
    dict(process="absorbing", mask_token_id=MASK, time_conditioning=False),
    dict(process="absorbing", mask_token_id=MASK, objective="ce"),
)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    built = [SFDLMForDiffusionLM(tiny_config(**spec)).eval() for spec in MODEL_SPECS]
    built.append(SFDLMForDiffusionLM(tiny_config(**MODEL_SPECS[2])).to(torch.bfloat16).eval())
    return built


@st.composite
def model_inputs(draw, num_models: int):
    hostile: set[str] = set()
    index = draw(st.integers(0, num_models - 1))
    spec = MODEL_SPECS[min(index, len(MODEL_SPECS) - 1)] if index < len(MODEL_SPECS) else MODEL_SPECS[2]
    absorbing = spec["process"] == "absorbing"
    batch, length = draw(st.integers(1, 3)), draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, MASK if absorbing else VOCAB, (batch, length), generator=gen)
    likelihood = spec.get("objective", "elbo") != "ce"  # a CE model's nelbo is refused by design
    mode = draw(st.sampled_from(["logits", "loss", "nelbo"] if likelihood else ["logits", "loss"]))

    def bad_ids():
        kind = draw(st.sampled_from(["negative", "too_large", "float", "bool", "list", "1d", "3d", "empty",
                                     "int16", "uint8", "none"]))
        return {"negative": lambda: clean - clean.max() - 1, "too_large": lambda: clean + VOCAB,
                "float": lambda: clean.float(), "bool": lambda: clean > 3, "list": lambda: clean.tolist(),
                "1d": lambda: clean[0], "3d": lambda: clean[None], "empty": lambda: clean[:, :0],
                "int16": lambda: clean.short(), "uint8": lambda: clean.to(torch.uint8), "none": lambda: None}[kind]()

    ids = pick(draw, st.sampled_from([clean, clean.int()]), st.builds(bad_ids), "input_ids", hostile)
    lengths = torch.tensor(draw(st.lists(st.integers(1, length), min_size=batch, max_size=batch)))
    padded = (torch.arange(length) < lengths[:, None]).long()

    def bad_mask():
        kind = draw(st.sampled_from(["list", "half", "minus_one", "two", "shape", "empty_row", "float_nan"]))
        return {"list": lambda: padded.tolist(), "half": lambda: padded * 0.5, "minus_one": lambda: -padded,
                "two": lambda: padded * 2, "shape": lambda: padded[:, :-1] if length > 1 else padded[:, :0],
                "empty_row": lambda: torch.zeros_like(padded),
                "float_nan": lambda: torch.full(padded.shape, NAN)}[kind]()

    mask = pick(draw, st.sampled_from([None, padded, padded.bool(), torch.ones_like(padded)]), st.builds(bad_mask),
                "attention_mask", hostile)
    some_unscored = clean.masked_fill(torch.rand(clean.shape, generator=gen) < 0.3, -100)
    some_unscored[:, 0] = clean[:, 0]  # every row keeps a scored position

    def bad_labels():
        kind = draw(st.sampled_from(["too_large", "negative", "float", "shape", "all_ignored", "list", "mask_id"]))
        mask_id = clean.clone()
        mask_id[:, 0] = MASK
        return {"too_large": lambda: clean + VOCAB, "negative": lambda: clean - 50, "float": lambda: clean.float(),
                "shape": lambda: torch.cat([clean, clean], 1), "all_ignored": lambda: torch.full_like(clean, -100),
                "list": lambda: clean.tolist(), "mask_id": lambda: mask_id}[kind]()

    labels = None
    if mode != "logits":  # `loss` means forward(labels=...); without labels forward returns logits
        labels = pick(draw, st.sampled_from([clean, some_unscored] + ([None] if mode == "nelbo" else [])),
                      st.builds(bad_labels), "labels", hostile)
    t_good = st.one_of(st.floats(0.0, 1.0), st.builds(lambda: torch.rand(batch, generator=gen)),
                       st.builds(lambda: torch.rand((), generator=gen)))
    t_bad = st.one_of(st.sampled_from([NAN, INF, -0.5, 1.5, "0.5", [0.5] * batch]),
                      st.builds(lambda: torch.rand(batch + 1, generator=gen)),
                      st.builds(lambda: torch.full((batch,), NAN)),
                      st.builds(lambda: torch.ones(batch, dtype=torch.long)))
    timesteps = None
    if mode == "logits":
        if spec.get("time_conditioning", True):
            timesteps = pick(draw, t_good, t_bad, "timesteps", hostile)
        else:
            timesteps = pick(draw, st.none(), t_bad, "timesteps", hostile)
    generator = pick(draw, st.one_of(st.none(), st.builds(lambda s: torch.Generator().manual_seed(s), st.integers(0, 9))),
                     st.sampled_from([123, "seed", [torch.Generator()]]), "generator", hostile)
    num_samples = pick(draw, st.integers(1, 3), st.sampled_from([0, -1, 2.5, "4", True, None]), "num_samples",
                       hostile) if mode == "nelbo" else None
    autocast = draw(st.booleans())
    return dict(index=index, mode=mode, input_ids=ids, attention_mask=mask, labels=labels, timesteps=timesteps,
                generator=generator, num_samples=num_samples, autocast=autocast), hostile


def run_model(model, example) -> None:
    mode = example["mode"]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=example["autocast"]):
        if mode == "logits":
            logits = model(example["input_ids"], attention_mask=example["attention_mask"],
                           timesteps=example["timesteps"]).logits
            if torch.isnan(logits).any() or (logits == math.inf).any():
                raise BadOutput("logits hold NaN or +inf")
        elif mode == "loss":
            with torch.no_grad():
                loss = model(example["input_ids"], attention_mask=example["attention_mask"], labels=example["labels"],
                             generator=example["generator"]).loss
            if not torch.isfinite(loss):
                raise BadOutput(f"loss {loss.item()}")
        else:
            kwargs = {} if example["num_samples"] is None else {"num_samples": example["num_samples"]}
            nelbo = model.nelbo(example["input_ids"], attention_mask=example["attention_mask"], labels=example["labels"],
                                generator=example["generator"], **kwargs)
            if not torch.isfinite(nelbo).all() or (nelbo < 0).any():
                raise BadOutput(f"NELBO {nelbo.tolist()}")


def describe(example: dict) -> str:
    def show(value):
        if isinstance(value, torch.Tensor):
            return f"tensor{tuple(value.shape)}:{value.dtype}:{value.flatten()[:6].tolist()}"
        return repr(value)[:80]

    spec = MODEL_SPECS[example["index"]] if example["index"] < len(MODEL_SPECS) else {**MODEL_SPECS[2], "dtype": "bf16"}
    return f"model {spec} " + ", ".join(f"{k}={show(v)}" for k, v in example.items() if k != "index")


@fuzz_settings(150)
@given(st.data())
def test_forward_and_nelbo_inputs(models, data):
    example, hostile = data.draw(model_inputs(len(models)))
    model = models[example["index"]]
    surface = "nelbo" if example["mode"] == "nelbo" else "forward"
    record(surface, lambda: run_model(model, example), hostile, describe(example))


# ---------------------------------------------------------------------------------------------- generate
GEN_SPECS = (dict(process="absorbing", mask_token_id=MASK, num_timesteps=None),
             dict(process="uniform", num_timesteps=None))


@pytest.fixture(scope="module")
def generators_models():
    torch.manual_seed(0)
    return [SFDLMForDiffusionLM(tiny_config(**spec)).eval() for spec in GEN_SPECS]


@st.composite
def generate_arguments(draw):
    hostile: set[str] = set()
    index = draw(st.integers(0, len(GEN_SPECS) - 1))
    absorbing = GEN_SPECS[index]["process"] == "absorbing"
    batch, length = draw(st.integers(1, 2)), draw(st.integers(1, 6))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    prompt = torch.randint(0, MASK, (batch, length), generator=gen)
    infill = prompt.clone()
    infill[:, -1] = MASK
    args: dict = {}

    def bad_ids():
        kind = draw(st.sampled_from(["negative", "too_large", "float", "list", "1d", "empty"]))
        return {"negative": lambda: -prompt - 1, "too_large": lambda: prompt + VOCAB, "float": lambda: prompt.float(),
                "list": lambda: prompt.tolist(), "1d": lambda: prompt[0], "empty": lambda: prompt[:, :0]}[kind]()

    args["input_ids"] = pick(draw, st.sampled_from([None, prompt, infill, prompt.int()]), st.builds(bad_ids),
                             "input_ids", hostile)
    if isinstance(args["input_ids"], torch.Tensor) and "input_ids" not in hostile and draw(st.booleans()):
        lengths = torch.tensor(draw(st.lists(st.integers(1, length), min_size=batch, max_size=batch)))
        padded = (torch.arange(length) >= (length - lengths)[:, None]).long()  # left padding
        args["attention_mask"] = pick(draw, st.just(padded), st.sampled_from(
            [padded.tolist(), padded * 0.5, -padded, padded[:, :-1] if length > 1 else padded[:, :0]]),
            "attention_mask", hostile)
    has_masks = args["input_ids"] is infill
    args["max_new_tokens"] = pick(draw, st.integers(0 if has_masks else 1, 6),  # 0 with nothing to fill is refused
                                  st.sampled_from([-1, 2.5, "3", True, NAN]), "max_new_tokens", hostile)
    args["steps"] = pick(draw, st.integers(1, 6), st.sampled_from([0, -2, 1.5, "4", None, NAN]), "steps", hostile)
    options = {
        "temperature": (st.sampled_from([0.0, 0.5, 1.0, 2.0]), st.sampled_from([1e-40, 1e-300, NAN, INF, -1.0, "1"])),
        "top_k": (st.integers(0, VOCAB + 4), st.sampled_from([-1, 2.5, "5", NAN])),
        "top_p": (st.floats(0.05, 1.0), st.sampled_from([0.0, 1.5, NAN, -0.1, "0.9"])),
        "sampler": (st.sampled_from(["ancestral", "confidence", "threshold"] if absorbing else ["uniform"]),
                    st.sampled_from(["beam", "", 3])),
        "confidence_measure": (st.sampled_from(["max_prob", "margin", "entropy"]), st.sampled_from(["logit", 1])),
        "confidence_threshold": (st.floats(0.05, 1.0), st.sampled_from([0.0, 1.5, NAN])),
        "block_length": (st.integers(1, 4), st.sampled_from([0, -1, 1.5])),
        "num_return_sequences": (st.integers(1, 2), st.sampled_from([0, -1, 1.5, "2"])),
        "stop_when_stable": (st.integers(0, 3), st.sampled_from([-1, 0.5])),
        "eos_token_id": (st.integers(0, VOCAB - 2), st.sampled_from([-1, [], "3", 2.5])),
        "pad_token_id": (st.integers(0, VOCAB - 2), st.sampled_from([-1, VOCAB + 5, 2.5])),
        "mask_token_id": (st.just(MASK), st.sampled_from([-1, VOCAB, 2.5])),
        "return_dict_in_generate": (st.booleans(), st.sampled_from(["yes", 1])),
    }
    for name in draw(st.lists(st.sampled_from(sorted(options)), max_size=4, unique=True)):
        good, bad = options[name]
        args[name] = pick(draw, good, bad, name, hostile)
    if "block_length" in args and "block_length" not in hostile and "steps" not in hostile \
            and isinstance(args["max_new_tokens"], int):  # every block needs a step (the input's masks: one more)
        args["steps"] = max(args["steps"], -(-args["max_new_tokens"] // args["block_length"]) + 1)
    copies = args.get("num_return_sequences")
    rows = (batch if isinstance(args["input_ids"], torch.Tensor) and args["input_ids"].dim() == 2 else 1) * (
        copies if isinstance(copies, int) and not isinstance(copies, bool) else 1)
    if draw(st.booleans()):
        args["generator"] = pick(
            draw, st.sampled_from([torch.Generator().manual_seed(1), [torch.Generator().manual_seed(i) for i in range(max(rows, 1))]]),
            st.sampled_from([123, "seed", [torch.Generator()] * (max(rows, 1) + 1)]), "generator", hostile)
    return index, args, hostile


def run_generate(model, args: dict) -> None:
    out = model.generate(**args)
    sequences = out.sequences if hasattr(out, "sequences") else out
    if not isinstance(sequences, torch.Tensor) or sequences.dtype != torch.long:
        raise BadOutput(f"generate returned {type(sequences).__name__}")
    if sequences.numel() and (sequences.min() < 0 or sequences.max() >= VOCAB):
        raise BadOutput(f"ids outside [0, {VOCAB}): {sequences.tolist()}")
    mask = model.config.mask_token_id
    if mask is not None and (sequences == mask).any():
        raise BadOutput(f"mask tokens left in a finished generation: {sequences.tolist()}")


@fuzz_settings(80)
@given(generate_arguments())
def test_generate_arguments(generators_models, example):
    index, args, hostile = example
    description = f"model {GEN_SPECS[index]} " + ", ".join(
        f"{k}={tuple(v.shape) if isinstance(v, torch.Tensor) else repr(v)[:60]}" for k, v in args.items())
    record("generate", lambda: run_generate(generators_models[index], args), hostile, description)
