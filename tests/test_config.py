"""Every shipped params file parses; unknown and missing keys are named in one error; overrides apply by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import load_params
from pipeline.errors import MimicError

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_params_parse():
    from pipeline.methods import TRAINED, method_configs

    params = load_params(ROOT / "params.yaml")
    assert params.model.name == "embedded" and params.extract.k > 0 and params.methods["mimic"]["lr"] > 0
    configs = method_configs(params.methods)  # every method's section, by its own config class
    assert set(configs) == set(TRAINED) and set(params.trained) <= set(configs)
    assert configs["lora"].r == 16 and configs["live"].kl_weight > 0 and configs["hificl"].align_weight == 0


def test_overrides_by_name_and_types(tmp_path):
    params = load_params(
        ROOT / "params.yaml", ["methods.mimic.lr=0.5", "extract.layers=[0, 2]", "train.epochs=3"]
    )
    assert (
        params.methods["mimic"]["lr"] == 0.5 and params.extract.layers == [0, 2] and params.train.epochs == 3
    )
    with pytest.raises(MimicError, match="has no field 'train.lrr'"):
        load_params(ROOT / "params.yaml", ["train.lrr=1"])
    with pytest.raises(MimicError, match=r"train.epochs must be int, got 'many'"):
        load_params(ROOT / "params.yaml", ["train.epochs=many"])


def test_unknown_and_missing_keys_listed_together(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"]["n_epochs"] = raw["train"].pop("epochs")
    raw["train"]["momentum"] = 0.9
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(MimicError) as err:
        load_params(path)
    message = str(err.value)
    assert "unknown keys ['momentum', 'n_epochs']" in message and "missing keys ['epochs']" in message
    assert "\n" not in message
    from pipeline.methods import method_configs

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["methods"]["lora"]["rank"] = raw["methods"]["lora"].pop("r")
    with pytest.raises(MimicError, match=r"methods.lora: unknown keys \['rank'\]; missing keys \['r'\]"):
        method_configs(raw["methods"])
    raw["methods"]["bogus"] = {}
    with pytest.raises(MimicError, match="methods: unknown \\['bogus'\\]"):
        method_configs(raw["methods"])


def test_missing_params_file(tmp_path):
    with pytest.raises(MimicError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_the_readme_real_checkpoint_example_parses(tmp_path):
    text = (ROOT / "README.md").read_text()
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]  # the real-checkpoint parameters
    path = tmp_path / "params.yaml"
    path.write_text(block)  # verbatim: a user copies it whole
    params = load_params(path)
    assert params.extract.k == 8 and params.extract.positions == "text" and params.evaluate.num_beams == 3
    assert params.prompt == load_params(ROOT / "params.yaml").prompt and params.data.workers == 2


def test_config_choices_match_the_modules_that_use_them():
    from pipeline import config, families, methods, models
    from pipeline.cache import codecs as cache_codecs

    assert config.SITES == families.SITES and config.CODECS == cache_codecs.CODECS
    assert config.PROMPT_METHODS == methods.PROMPT_METHODS and set(config.DTYPES) == set(models.DTYPES)


def test_a_text_field_override_takes_the_text_as_written():
    # YAML would read "{question}" as a mapping and "Q: {question} A: {answer}{image}" not at all
    for prompt in ("{image}{question} {answer}\n", "Q: {question} A: {answer}{image}"):
        assert load_params(ROOT / "params.yaml", [f"prompt={prompt}"]).prompt == prompt
    quoted = load_params(ROOT / "params.yaml", ['prompt="{image}Q: {question} A: {answer}\\n"'])
    assert quoted.prompt == "{image}Q: {question} A: {answer}\n"  # YAML's double quotes give the escapes
    assert load_params(ROOT / "params.yaml", ["model.device=cuda:1"]).model.device == "cuda:1"
    encoder = ["data.rices_encoder=/m/clip", "data.rices_encoder=null"]  # a text field set back to null
    assert load_params(ROOT / "params.yaml", encoder).data.rices_encoder is None
    with pytest.raises(MimicError, match=r"the value is not valid YAML"):  # other fields keep YAML's rules
        load_params(ROOT / "params.yaml", ["extract.layers=[0, 2"])


def test_a_layer_listed_twice_is_refused():
    # it would be cached twice and weigh twice in the alignment loss
    with pytest.raises(MimicError, match=r"extract.layers=\[3, 1, 1\]: name each layer once"):
        load_params(ROOT / "params.yaml", ["extract.layers=[3, 1, 1]"])


def test_a_params_file_that_is_not_a_mapping_is_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("- model\n- data\n")
    with pytest.raises(MimicError, match=r"must hold a mapping of sections .*not a list"):
        load_params(path, ["extract.k=2"])
