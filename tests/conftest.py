import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter on the CPU (set before triton.jit)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from glakeserve import vtensor  # noqa: E402


def gpu_available() -> bool:
    return torch.cuda.is_available() and vtensor.cuda_available()


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and libcuda (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# The allocator's semantic tests run on both backends: host everywhere, cuda where a GPU is.
BACKENDS = ["host", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


def small_page_size(backend: str) -> int | None:
    """Host tests use 4 KiB pages to stay fast; cuda must use the driver's granularity."""
    return 4096 if backend == "host" else None


@pytest.fixture
def pool(backend):
    p = vtensor.PagePool(16, page_size=small_page_size(backend), backend=backend)
    yield p
    p.close()


@pytest.fixture(scope="session")
def smollm2_dir():
    """The embedded default model, converted from its GGUF once (cached for later runs)."""
    from glakeserve.model.loader import resolve_model

    return resolve_model(None).path


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def smol_llm(smollm2_dir):
    """One SmolLM2 engine per test module (loading takes a few seconds)."""
    from glakeserve.llm import LLM

    llm = LLM(max_model_len=512, max_num_seqs=8, kv_cache_memory=96 << 20, check_integrity=True)
    yield llm
    llm.close()
