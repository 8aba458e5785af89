"""Our top-level `kernels` package shares its name with the Hugging Face hub's `kernels`, which
transformers imports when it believes it is installed. transformers decides with
`_is_package_available("kernels")`: find_spec finds OUR package; the version comes from the
distribution that ships it (packages_distributions() -> "localchat", so localchat's version) or, with
no metadata, from `kernels.__version__`. It then requires 0.18.2 <= version < 0.19 (KERNELS_MIN/MAX_VERSION).
So it is harmless only while localchat's version stays outside that range and `kernels` has no __version__.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from packaging import version

REPO = Path(__file__).resolve().parent.parent

PROBE = textwrap.dedent(
    """
    import torch
    import kernels
    assert kernels.__file__.startswith(REPO), kernels.__file__
    import transformers
    from transformers.utils import is_kernels_available
    assert is_kernels_available() is False, "transformers mistook localchat's kernels for the hub package"
    import transformers.integrations.hub_kernels  # imports `from kernels import ...` only if it thinks so
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        out = model(torch.arange(10)[None]).logits
    assert out.shape == (1, 10, 64) and torch.isfinite(out).all()
    print("ok")
    """
)


def test_transformers_does_not_mistake_our_kernels_package(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.pop("USE_HUB_KERNELS", None)
    result = subprocess.run(
        [sys.executable, "-c", f"REPO = {str(REPO)!r}\n" + PROBE],
        cwd=tmp_path,  # not the repo root, so the import goes through the installed path entries
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_version_guards_hold():
    import kernels
    from transformers.utils import import_utils

    # Without package metadata transformers reads kernels.__version__: it must not exist.
    assert not hasattr(kernels, "__version__")
    # With metadata it reads localchat's version: it must stay outside transformers' accepted range.
    try:
        ours = version.parse(importlib.metadata.version("localchat"))
    except importlib.metadata.PackageNotFoundError:
        return
    low = version.parse(import_utils.KERNELS_MIN_VERSION)
    high = version.parse(import_utils.KERNELS_MAX_VERSION)
    assert not (low <= ours < high), f"localchat {ours} falls in hub kernels' range [{low}, {high})"
