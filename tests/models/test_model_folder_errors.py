"""Every broken model folder is one `ModelError` naming the folder and what is wrong with it."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from model_folder_edits import edit_tensors, truncate_weights

from rlhf_jax.models.checkpoint_io import is_adapter_folder, load_pretrained, read_safetensors, save_pretrained
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.errors import ModelError
from rlhf_jax.models.transformer import CausalLM

TINY = ModelConfig.llama(vocab_size=16, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16,
                         max_position_embeddings=16)
K_PROJ = "model.layers.0.self_attn.k_proj.weight"


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    module = CausalLM(TINY)
    params = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"]
    return save_pretrained(tmp_path_factory.mktemp("good") / "model", module, params)


def _edit_config(**fields):
    def apply(folder):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **fields}))
    return apply


BREAKAGES = {
    "no config.json": (lambda f: (f / "config.json").unlink(), r"no config\.json"),
    "config.json not JSON": (lambda f: (f / "config.json").write_bytes(b"{\xff"), r"config\.json: invalid JSON"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), r"no \*\.safetensors weights"),
    "pytorch_model.bin only": (lambda f: (f / "model.safetensors").rename(f / "pytorch_model.bin"),
                               r"no \*\.safetensors weights.*found pytorch_model\.bin"),
    "truncated weights": (truncate_weights(0.5), r"model\.safetensors: truncated: tensor '.*' ends at data byte"),
    "header cut off": (lambda f: (f / "model.safetensors").write_bytes(b"\x10\x00"),
                       r"model\.safetensors: not a safetensors file, or truncated"),
    "unknown model_type": (_edit_config(model_type="t5"), r"config\.json: model_type 't5' is not supported"),
    "missing config field": (_edit_config(hidden_size=None),
                             r"config\.json: (missing or invalid field|.*hidden_size)"),
    "wrong shape": (edit_tensors(lambda t: t.update({K_PROJ: np.zeros((3, 8), np.float32)})),
                    rf"tensor '{K_PROJ}' has shape \(3, 8\) but the config expects"),
    "missing tensor": (edit_tensors(lambda t: t.pop(K_PROJ)), rf"missing tensor '{K_PROJ}'"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_broken_folder_is_one_model_error_naming_it(good_folder, tmp_path, breakage):
    folder = tmp_path / "model"
    shutil.copytree(good_folder, folder)
    breaking, message = BREAKAGES[breakage]
    breaking(folder)
    with pytest.raises(ModelError, match=message) as error:
        load_pretrained(folder)
    assert error.value.folder == str(folder)
    assert str(error.value).startswith(f"{folder}: ")


def test_missing_folder_and_bad_head(tmp_path, good_folder):
    with pytest.raises(ModelError, match="no such model folder") as error:
        load_pretrained(tmp_path / "absent")
    assert error.value.folder == str(tmp_path / "absent")
    with pytest.raises(ValueError, match="`head`") as error:  # a programming error, not the folder's
        load_pretrained(good_folder, head="classifier")
    assert not isinstance(error.value, ModelError)


def test_safetensors_span_must_fit_the_shape(tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file({"w": np.arange(6, dtype=np.float32)}, path)
    data = bytearray(path.read_bytes())
    header_size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_size])
    header["w"]["shape"] = [7]  # claims one more element than its bytes hold
    text = json.dumps(header, separators=(",", ":")).encode().ljust(header_size)
    assert len(text) == header_size
    path.write_bytes(bytes(data[:8]) + text + bytes(data[8 + header_size :]))
    with pytest.raises(ModelError, match=r"'w' spans bytes 0\.\.24, which does not fit its shape \(7,\)"):
        read_safetensors(path)


def test_model_error_pickles():
    import pickle

    error = pickle.loads(pickle.dumps(ModelError("/a/b", "no config.json")))
    assert (error.folder, error.what, str(error)) == ("/a/b", "no config.json", "/a/b: no config.json")


@pytest.mark.parametrize("base", ["org/base-model", None])
def test_a_peft_adapter_folder_is_named_as_such(tmp_path, good_folder, base):
    """An adapter folder (`adapter_config.json`, no `config.json`) given as a model folder."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": base}))
    assert is_adapter_folder(adapter) and not is_adapter_folder(good_folder)
    with pytest.raises(ModelError, match=r"a PEFT adapter folder, not a model folder: load its base model"
                                         r".*load_peft_adapter") as error:
        load_pretrained(adapter)
    assert str(error.value).startswith(f"{adapter}: ")
    assert ("(org/base-model)" in str(error.value)) == (base is not None)
    # a model folder that also holds adapter files still loads
    both = tmp_path / "both"
    shutil.copytree(good_folder, both)
    (both / "adapter_config.json").write_text("{}")
    assert not is_adapter_folder(both)
    load_pretrained(both)
