"""Session fixtures: the tiny random Hugging Face causal LMs of `hf_oracles`, saved once."""
import pytest

from hf_oracles import HF_LM_CLASSES, build_hf_model


@pytest.fixture(scope="session")
def hf_lm(tmp_path_factory):
    """family -> (folder, torch model) for the three tiny causal LMs."""
    out = {}
    for seed, family in enumerate(HF_LM_CLASSES):
        folder = tmp_path_factory.mktemp(f"hf_{family}")
        out[family] = (folder, build_hf_model(family, folder, seed=seed))
    return out

