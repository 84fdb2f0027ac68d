"""Consent for code: hf_sfdlm never runs the Python files of a model folder unless the user says so.

A saved SFDLM folder carries copies of this package's modules (`configuration_sfdlm.py`,
`modeling_sfdlm.py`, ...) so that `AutoModel.from_pretrained(..., trust_remote_code=True)` works without
hf_sfdlm installed. With hf_sfdlm installed, none of that code is needed: the model types this package
registers (`sfdlm`, `transformer_denoiser`) load with the installed classes. `check_folder_code` decides,
before transformers sees the folder:

* a registered model type whose folder code is byte-identical to the installed modules (or absent): load
  with the installed classes, `trust_remote_code=False`; no folder code runs;
* a registered model type whose folder code differs from the installed modules: refused with a
  `ValueError` naming the files, unless the user passes `trust_remote_code=True` (transformers then still
  prefers the registered classes for these types);
* a model type transformers has no class for, with code (`auto_map` or `*.py` files): refused unless
  `trust_remote_code=True`, which transformers then honours by importing the folder's code;
* a model type transformers itself provides: left to transformers (its own classes unless the user passes
  `trust_remote_code=True`).
"""

from __future__ import annotations

import os
from pathlib import Path

TRUST_REMOTE_CODE_HELP = ("Allow running Python code shipped in the model folder/repo (default: never; hf_sfdlm "
                          "models load with the installed classes, and folders whose code differs are refused).")
PACKAGE_DIR = Path(__file__).resolve().parent


def check_trust_remote_code(trust_remote_code) -> bool:
    """`trust_remote_code` if it is True or False (a string such as "yes" is not consent), else `TypeError`."""
    if not isinstance(trust_remote_code, bool):
        raise TypeError(f"`trust_remote_code` must be True or False, got {trust_remote_code!r}.")
    return trust_remote_code


def _installed_class_module(model_type: str) -> str | None:
    """The module of the config class registered locally for `model_type`, or None if transformers knows no
    local class for it."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from . import baselines  # noqa: F401  (registers the Transformer denoiser)
    from . import register_auto_classes

    register_auto_classes()
    try:
        return CONFIG_MAPPING[model_type].__module__
    except KeyError:
        return None


def folder_code_differences(folder: str | os.PathLike) -> list[str]:
    """The folder's top-level `*.py` files that are not byte-identical to the installed hf_sfdlm module of
    the same name, each with the reason."""
    differences = []
    for path in sorted(Path(folder).glob("*.py")):
        installed = PACKAGE_DIR / path.name
        if not installed.is_file():
            differences.append(f"{path.name} (no such module in the installed hf_sfdlm)")
        elif path.read_bytes() != installed.read_bytes():
            differences.append(f"{path.name} (differs from {installed})")
    return differences


def check_folder_code(folder: str | os.PathLike, config: dict, trust_remote_code: bool = False,
                      name: str | None = None) -> bool:
    """Decide, without importing anything from `folder`, whether loading it may go ahead; return the
    `trust_remote_code` value to give transformers. `config` is the folder's parsed config.json; `name`
    is what the user asked for (a repo id), used in messages. Raises `ValueError` when loading would need
    code the user has not allowed."""
    check_trust_remote_code(trust_remote_code)
    name = name or str(folder)
    model_type = config.get("model_type")
    module = _installed_class_module(model_type) if isinstance(model_type, str) else None
    if module is not None and module.startswith(f"{__package__}."):
        differences = folder_code_differences(folder)
        if differences and not trust_remote_code:
            from . import __version__

            raise ValueError(
                f"The code in {name!r} is not the installed hf_sfdlm {__version__}'s: {'; '.join(differences)}. "
                "hf_sfdlm does not run a model folder's code without your consent. Inspect those files; if you "
                "trust them, pass trust_remote_code=True (--trust-remote-code) to load the model anyway (with the "
                "installed classes, which transformers prefers for registered model types), or save the model "
                "again with the installed hf_sfdlm.")
        return trust_remote_code
    code = sorted(path.name for path in Path(folder).glob("*.py"))
    if module is None and (config.get("auto_map") or code) and not trust_remote_code:
        raise ValueError(
            f"{name!r} has model_type {model_type!r}, which neither hf_sfdlm nor transformers provides, so loading "
            f"it would run the Python code it ships ({', '.join(code) or 'auto_map: ' + str(config.get('auto_map'))}). "
            "hf_sfdlm never does that on your behalf: inspect the code and pass trust_remote_code=True "
            "(--trust-remote-code) if you trust it.")
    return trust_remote_code


__all__ = ["TRUST_REMOTE_CODE_HELP", "check_folder_code", "check_trust_remote_code", "folder_code_differences"]
